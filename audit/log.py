"""The audit log the server holds: group-committed appends, signed checkpoints, proofs.

Invariants (DESIGN.md §6; RFC 9162 §2.1; c2sp.org/tlog-checkpoint):

* One writer thread owns the leaf table. It drains a queue of pending appends, gives them the
  next contiguous indexes, inserts them with the subtree hashes they complete in one
  transaction (SQLite ``synchronous=FULL``, PostgreSQL default durability), and only after the
  commit returns does it publish the new tree size and resolve the callers. An append
  therefore returns only when durable. The tree lives in the database
  (:mod:`centinela.audit.stored_tree`): memory does not grow with the log.
* If the database fails, every waiter of that batch gets ``AuditUnavailable`` (fail closed: no
  result may be served without its audit record), the writer drops its connection and, before
  the next batch, publishes any leaves the database holds beyond its size, so an
  index is never given twice. A store that holds fewer leaves than the tree already published
  is tampering: the log refuses every further append.
* Before signing a checkpoint the log proves, with an RFC 9162 consistency proof checked
  against the root of the last checkpoint it signed, that the new tree extends it; otherwise
  it refuses to sign (``InconsistentCheckpointError``). The same check runs at start-up against
  the latest stored checkpoint, so a log rewritten behind the server's back does not open.
* Checkpoints are cut every N entries or T seconds (whichever comes first), on demand, and on
  close. Entries reach this module as bytes or :class:`~centinela.audit.entry.AuditEvent`
  objects; the latter are validated and canonicalised on the caller's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection, Engine

from centinela.audit.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    Signer,
    Verifier,
    open_checkpoint,
    sign_checkpoint,
)
from centinela.audit.entry import AuditEvent, validate_entry_bytes
from centinela.audit.keys import load_or_create_hmac_key, load_or_create_signing_key
from centinela.audit.merkle import SubtreeHashes, verify_consistency
from centinela.audit.store import Companion, ConnectionLost, LeafStore
from centinela.audit.stored_tree import Growth, StoredTree
from centinela.errors import (
    AppendOnlyViolation,
    AuditUnavailable,
    CentinelaError,
    InconsistentCheckpointError,
    VerificationError,
)
from centinela.logs import get_logger

__all__ = [
    "AppendReceipt",
    "AuditLog",
    "load_or_create_hmac_key",
    "load_or_create_signing_key",
]

DEFAULT_ORIGIN = "centinela.local/audit"
_log = get_logger("centinela.audit.log")
_CLOSE = object()
_LEAF_PREFIX = b"\x00"


@dataclasses.dataclass(frozen=True, slots=True)
class AppendReceipt:
    """Where an entry landed: its leaf index and its leaf hash (hex)."""

    index: int
    leaf_hash: str


# A pending append: (entry bytes, leaf hash, waiter, loop or None for a thread waiter,
# companion writes or None).
_Item = tuple[bytes, bytes, Any, asyncio.AbstractEventLoop | None, Companion | None]


def _resolve_many(results: list[tuple[Any, object]]) -> None:
    for fut, res in results:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class AuditLog:
    """A tamper-evident, group-committed audit log over a :class:`LeafStore`.

    Use :meth:`open` (migrates, loads, checks, starts); :meth:`close` flushes pending appends
    and cuts a final checkpoint. ``max_batch=1`` gives one commit per append (a baseline for
    benchmarks, not for production).
    """

    def __init__(
        self,
        engine: Engine,
        signing_key: Ed25519PrivateKey,
        origin: str = DEFAULT_ORIGIN,
        *,
        checkpoint_every_entries: int = 1000,
        checkpoint_every_seconds: float = 10.0,
        max_batch: int = 4096,
        verify_at_open: bool = False,
        resume_guard: Callable[[], bool] | None = None,
    ) -> None:
        if checkpoint_every_entries < 1 or checkpoint_every_seconds <= 0 or max_batch < 1:
            raise ValueError("checkpoint intervals and max_batch must be positive")
        self.origin = origin
        self.store = LeafStore(engine)
        self._signer = Signer(origin, signing_key)
        self._verifier = Verifier(self._signer.verifier_key())
        self._every_n = checkpoint_every_entries
        self._every_s = checkpoint_every_seconds
        self._max_batch = max_batch
        self._tree = StoredTree(self.store)
        self._cp_lock = threading.RLock()  # serialises checkpoint signing
        self._last_cp: SignedCheckpoint | None = None
        self._last_cp_time = time.monotonic()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._needs_reload = False
        self._fault: str | None = None
        #: Whether the last append failed, until an append or a probe succeeds (a database
        #: that cannot be reached, the server lock not held), and failed appends so far.
        self._failing = False
        self._failures = 0
        self._closed = False
        self._loaded = False
        self._verify_at_open = verify_at_open
        self._resume_guard = resume_guard
        self._verify_size = 0
        self._verify_stop = threading.Event()
        self._verify_thread: threading.Thread | None = None
        #: Whether every stored subtree agreed with the leaves when the log last opened: None
        #: while the check runs beside the service, True, or False (the log then refuses
        #: every append).
        self.history_verified: bool | None = None

    # --- life cycle ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        engine: Engine,
        signing_key: Ed25519PrivateKey,
        origin: str = DEFAULT_ORIGIN,
        *,
        checkpoint_every_entries: int = 1000,
        checkpoint_every_seconds: float = 10.0,
        max_batch: int = 4096,
        verify_at_open: bool = False,
        resume_guard: Callable[[], bool] | None = None,
    ) -> AuditLog:
        """Migrate the tables, open and check the tree, and start the writer.

        The tree's last signed root is checked before this returns; the check of every stored
        subtree against the leaves (O(n), ~1 s a million entries) runs beside the service and
        faults the log if the store was altered, or here first with ``verify_at_open``.

        ``resume_guard`` is asked before the writer appends again after a failed append: the
        writer resumes only once it returns True. A server passes its serving lock's check
        (:meth:`~centinela.server.instance.InstanceLock.check`): a PostgreSQL restart ends
        every session, the lock's with the writer's, and without the guard the writer would
        append again as soon as the database answered, before the lock was taken again or
        while another server held it.

        Raises:
            StorageError: the database failed.
            InconsistentCheckpointError: the stored leaves do not extend the last signed
                checkpoint (the log was truncated or rewritten).
            VerificationError: the last stored checkpoint is not signed by this key/origin.
        """
        log = cls(
            engine,
            signing_key,
            origin,
            checkpoint_every_entries=checkpoint_every_entries,
            checkpoint_every_seconds=checkpoint_every_seconds,
            max_batch=max_batch,
            verify_at_open=verify_at_open,
            resume_guard=resume_guard,
        )
        log.store.migrate()
        log.load()
        log.start()
        return log

    def load(self) -> None:
        """Open the stored tree and check it against the last checkpoint (and, with
        ``verify_at_open``, every stored subtree against the leaves)."""
        tree = StoredTree.open(self.store)
        stored = self.store.latest_checkpoint()
        last: SignedCheckpoint | None = None
        if stored is not None:
            last = open_checkpoint(stored.note, [self._verifier], origin=self.origin)
            _check_extends(tree.view(), last)
        if self._verify_at_open:
            tree.verify(tree.size)
            self.history_verified = True
        self._tree = tree
        self._verify_size = tree.size
        self._last_cp = last
        self._last_cp_time = time.monotonic()
        self._loaded = True

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if not self._loaded:
            self.store.migrate()
            self.load()
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(
                target=self._run, name="centinela-audit-writer", daemon=True
            )
            self._thread.start()
        if self.history_verified is None and self._verify_thread is None:
            self._verify_stop.clear()
            self._verify_thread = threading.Thread(
                target=self._verify_history, name="centinela-audit-verify", daemon=True
            )
            self._verify_thread.start()

    def _verify_history(self) -> None:
        """Check every stored subtree of the log as opened against its leaves, beside the
        service; an alteration faults the log (fail closed), a database error is retried."""
        delay = 1.0
        while not self._verify_stop.is_set():
            try:
                done = self._tree.verify(self._verify_size, self._verify_stop)
            except VerificationError as exc:
                self.history_verified = False
                self._fault = "the audit store was altered behind the server: refusing"
                # The message names a level and an index, never an entry's content.
                _log.critical("audit_store_altered", error=str(exc))
                return
            except Exception as exc:  # the database: try again, the service goes on
                _log.error("audit_history_check_failed", error=exc.__class__.__name__)
                self._verify_stop.wait(delay)
                delay = min(60.0, delay * 2)
                continue
            if done:
                self.history_verified = True
                _log.info("audit_history_verified", entries=self._verify_size)
            return

    def close(self) -> None:
        """Flush pending appends, cut a final checkpoint, stop the writer."""
        if self._thread is None:
            return
        self._closed = True
        self._verify_stop.set()
        if self._verify_thread is not None:
            self._verify_thread.join(30)
            self._verify_thread = None
        self._queue.put(_CLOSE)
        self._thread.join()
        self._thread = None
        self._drop_conn()
        self._fail_leftovers()
        try:
            if self._fault is None and (self._last_cp is None or self.size > self._last_cp.size):
                self.checkpoint()
        except CentinelaError as exc:
            _log.error("audit_final_checkpoint_failed", error=exc.__class__.__name__)

    # --- appends -------------------------------------------------------------------------

    def _prepare(self, entry: bytes | AuditEvent) -> tuple[bytes, bytes]:
        if self._closed or self._thread is None:
            raise AuditUnavailable("the audit log is not running")
        if self._fault is not None:
            raise AuditUnavailable(self._fault)
        data = entry.encode() if isinstance(entry, AuditEvent) else bytes(entry)
        validate_entry_bytes(data)
        return data, hashlib.sha256(_LEAF_PREFIX + data).digest()

    async def append(
        self, entry: bytes | AuditEvent, *, companion: Companion | None = None
    ) -> AppendReceipt:
        """Append an entry; return once it is durable.

        ``companion(conn, index)`` runs in the same database transaction as the entry, so
        its rows are durable exactly when the entry is (see ``LeafStore.append_batch``).
        It must not fail but for a database error, which fails the whole batch closed.

        Raises:
            AuditUnavailable: the log is closed, faulted, or the database failed.
            InvalidArgument: the entry is malformed.
        """
        data, leaf = self._prepare(entry)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AppendReceipt] = loop.create_future()
        self._queue.put((data, leaf, fut, loop, companion))
        return await fut

    def append_blocking(
        self, entry: bytes | AuditEvent, timeout: float | None = None
    ) -> AppendReceipt:
        """Append from a plain thread; return once the entry is durable.

        Raises:
            AuditUnavailable: the log is closed, faulted, the database failed, or the
                timeout passed (the entry may still be written later).
        """
        data, leaf = self._prepare(entry)
        fut: concurrent.futures.Future[AppendReceipt] = concurrent.futures.Future()
        self._queue.put((data, leaf, fut, None, None))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise AuditUnavailable("timed out waiting for the audit commit") from None

    # --- the writer ----------------------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        closing = False
        while not closing:
            timeout = max(0.0, self._last_cp_time + self._every_s - time.monotonic())
            try:
                first = q.get(timeout=timeout if timeout > 0 else 0.001)
            except queue.Empty:
                try:
                    self._maybe_checkpoint()
                except Exception as exc:  # as below: fail closed
                    self._broken(exc, [])
                continue
            batch: list[_Item] = []
            if first is _CLOSE:
                closing = True
            else:
                batch.append(first)  # type: ignore[arg-type]
            while len(batch) < self._max_batch:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is _CLOSE:
                    closing = True
                    continue
                batch.append(item)  # type: ignore[arg-type]
            if closing:
                # Drain whatever arrived before close so no waiter hangs.
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _CLOSE:
                        batch.append(item)  # type: ignore[arg-type]
            try:
                for start in range(0, len(batch), self._max_batch):
                    self._commit(batch[start : start + self._max_batch])
                self._maybe_checkpoint()
            except Exception as exc:  # a bug of ours: fail closed, never leave a waiter hanging
                self._broken(exc, batch)

    def _broken(self, exc: Exception, batch: Sequence[_Item]) -> None:
        """The writer hit an unexpected error: refuse every append from now on.

        The thread stays up, so an append that raced past the fault check is still
        answered (with AuditUnavailable, by ``_commit``) rather than left waiting forever.
        Waiters of ``batch`` not yet answered get the error; answered ones keep theirs.
        """
        self._fault = f"the audit writer failed ({exc.__class__.__name__}); restart the service"
        self._needs_reload = True
        _log.critical("audit_writer_failed", error=exc.__class__.__name__)
        err = AuditUnavailable(self._fault)
        err.__cause__ = exc
        self._fault_batch(batch, err)

    def _append(self, batch: Sequence[_Item]) -> tuple[int, Growth]:
        """Append ``batch`` durably at the tree's next index; returns the index and the
        growth, which the caller applies."""
        if self._fault is not None:
            raise AuditUnavailable(self._fault)
        if self._needs_reload:
            self._reload()
        if self._conn is None:
            self._conn = self.store.engine.connect()
        first = self._tree.size
        growth = self._tree.grow([b[1] for b in batch])
        self.store.append_batch(
            self._conn,
            first,
            [(b[0], b[1]) for b in batch],
            [b[4] for b in batch],
            growth.subtrees,
        )
        return first, growth

    def _commit(self, batch: Sequence[_Item]) -> None:
        results: list[object]
        try:
            try:
                first, growth = self._append(batch)
            except ConnectionLost:
                # The writer's connection had ended before anything was committed (the
                # database restarted since the last batch): once more on a new one, through
                # the reload and the resume guard, rather than fail the batch's callers.
                self._needs_reload = True
                self._drop_conn()
                first, growth = self._append(batch)
        except Exception as exc:  # fail closed whatever broke
            self._needs_reload = True
            self._failures += 1
            self._failing = True
            self._drop_conn()
            _log.error("audit_append_failed", error=exc.__class__.__name__, batch=len(batch))
            err = AuditUnavailable("the audit log could not make the entry durable")
            err.__cause__ = exc
            results = [err] * len(batch)
        else:
            self._tree.apply(growth)
            self._failing = False
            results = [AppendReceipt(first + i, item[1].hex()) for i, item in enumerate(batch)]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, object]]] = {}
        for item, res in zip(batch, results, strict=True):
            waiter, loop = item[2], item[3]
            if loop is None:
                if isinstance(res, BaseException):
                    waiter.set_exception(res)
                else:
                    waiter.set_result(res)
            else:
                by_loop.setdefault(loop, []).append((waiter, res))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_resolve_many, items)

    def _fail_leftovers(self) -> None:
        leftovers: list[_Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _CLOSE:
                leftovers.append(item)  # type: ignore[arg-type]
        if leftovers:
            self._fault_batch(leftovers, AuditUnavailable("the audit log closed"))

    def _fault_batch(self, batch: Sequence[_Item], err: AuditUnavailable) -> None:
        for _, _, waiter, loop, _companion in batch:
            if loop is None:
                if not waiter.done():
                    waiter.set_exception(err)
            else:
                items: list[tuple[Any, object]] = [(waiter, err)]
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve_many, items)

    def _reload(self) -> None:
        # The store first: while the database cannot be reached this fails at once (or in
        # a connection attempt's timeout), where the guard might first wait out the
        # lock's own silent connection.
        stored = self.store.size()
        if self._resume_guard is not None and not self._resume_guard():
            raise AuditUnavailable(
                "this server does not hold its database's serving lock (the database is down, "
                "or another server took it): not appending"
            )
        have = self._tree.size
        if stored < have:
            self._fault = "the audit store holds fewer leaves than were committed: refusing"
            _log.critical("audit_store_truncated", stored=stored, committed=have)
            raise AppendOnlyViolation(self._fault)
        if stored > have:
            self._tree.catch_up()
        self._needs_reload = False

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception as exc:  # the connection is already broken
                _log.debug("audit_conn_close_failed", error=exc.__class__.__name__)

    def _maybe_checkpoint(self) -> None:
        last_size = self._last_cp.size if self._last_cp else 0
        size = self._tree.size
        if size <= last_size and self._last_cp is not None:
            self._last_cp_time = time.monotonic()
            return
        due_n = size - last_size >= self._every_n
        due_t = time.monotonic() - self._last_cp_time >= self._every_s
        if not (due_n or due_t) or self._fault is not None:
            return
        try:
            self.checkpoint()
        except InconsistentCheckpointError:
            self._fault = "the audit tree is inconsistent with its last signed checkpoint"
            _log.critical("audit_checkpoint_inconsistent")
        except CentinelaError as exc:
            self._last_cp_time = time.monotonic()  # retry at the next interval
            _log.error("audit_checkpoint_failed", error=exc.__class__.__name__)

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> SignedCheckpoint:
        """Sign and store a checkpoint of the current tree (or return the last one if equal).

        Raises:
            InconsistentCheckpointError: the tree does not extend the last signed checkpoint.
            StorageError, AppendOnlyViolation: the database failed or refused the row.
        """
        with self._cp_lock:
            view = self._tree.view()
            size = view.size
            root = view.root()
            last = self._last_cp
            proof = (
                view.consistency_proof(last.size, size)
                if last is not None and 0 < last.size <= size
                else []
            )
            if last is not None:
                if last.size > size:
                    raise InconsistentCheckpointError(
                        "the tree is smaller than its last checkpoint"
                    )
                if last.size > 0 or size == 0:
                    try:
                        verify_consistency(last.size, size, last.root_hash, root, proof)
                    except VerificationError as exc:
                        raise InconsistentCheckpointError(
                            f"refusing to sign size {size}: not consistent with signed "
                            f"size {last.size}"
                        ) from exc
                if last.size == size:
                    self._last_cp_time = time.monotonic()
                    return last
            signed = sign_checkpoint(self._signer, Checkpoint(self.origin, size, root))
            self.store.add_checkpoint(size, root, signed.note)
            self._last_cp = signed
            self._last_cp_time = time.monotonic()
            return signed

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The last checkpoint this log signed or loaded."""
        return self._last_cp

    def verifier_key(self) -> str:
        """The log's public key in signed-note verifier-key format."""
        return self._signer.verifier_key()

    # --- reads ---------------------------------------------------------------------------

    @property
    def history_checked_size(self) -> int:
        """The size the history check covers: the log's size when it was opened."""
        return self._verify_size

    @property
    def fault(self) -> str | None:
        """Why the log refuses every append (altered store, writer failure), or None."""
        return self._fault

    def probe(self) -> str | None:
        """Why the log cannot append now, or None: its fault, or, after a failed append,
        whether the store answers again and the resume guard allows (blocking: it reads the
        database). A log whose last append failed stays not ready until an append or this
        probe succeeds, so a server that no client calls while it is not ready (a load
        balancer sends them elsewhere) still becomes ready again. The tree is left to the
        writer, which reloads it before its next append."""
        if self._fault is not None:
            return self._fault
        if not self._failing:
            return None
        failures = self._failures
        try:
            self.store.size()
        except Exception as exc:  # the database still cannot serve
            return f"the audit store cannot be read ({exc.__class__.__name__})"
        if self._resume_guard is not None and not self._resume_guard():
            return "this server does not hold its database's serving lock"
        if self._failures == failures:  # no append failed meanwhile
            self._failing = False
        return None

    @property
    def size(self) -> int:
        """Number of durable entries."""
        return self._tree.size

    def root(self, size: int | None = None) -> bytes:
        """Root hash at ``size`` (default: now). May read the database: not on the loop."""
        return self._tree.view().root(size)

    def leaf_hash(self, index: int) -> bytes:
        """The leaf hash at ``index``. May read the database: not on the loop."""
        return self._tree.view().leaf(index)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entry bytes ``[start, end)`` (end is clamped to the durable size)."""
        end = min(end, self.size)
        if start < 0 or start > end:
            raise ValueError("bad entry range")
        return self.store.entries(start, end)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size``."""
        return self._tree.view().inclusion_proof(index, size)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """RFC 9162 consistency proof between sizes ``m`` and ``n`` (0 < m <= n)."""
        return self._tree.view().consistency_proof(m, n)

    def packed_leaf_hashes(self, start: int, end: int) -> bytes:
        """Leaf hashes ``[start, end)`` concatenated, 32 bytes each."""
        if not 0 <= start <= end <= self.size:
            raise ValueError("bad leaf range")
        return self.store.packed_leaf_hashes(start, end)

    def compact_range(self, size: int) -> list[bytes]:
        """Perfect-subtree hashes covering ``[0, size)``, largest first."""
        return self._tree.view().compact_range(size)


def _check_extends(tree: SubtreeHashes, cp: SignedCheckpoint) -> None:
    if tree.size < cp.size:
        raise InconsistentCheckpointError(
            f"the store holds {tree.size} leaves but checkpoint size {cp.size} was signed: "
            "the log was truncated"
        )
    if tree.root(cp.size) != cp.root_hash:
        raise InconsistentCheckpointError(
            f"the stored leaves do not match the signed root at size {cp.size}: "
            "the log was rewritten"
        )
