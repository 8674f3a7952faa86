"""A phase-fair readers–writer lock.

hnswlib's ``knn_query`` may run concurrently with other queries but not with ``add_items``,
``mark_deleted`` or ``resize_index`` (its documentation says so), and it releases the GIL, so
the galleries let many searches in at once and give writers exclusive access. A waiting
writer blocks new readers, so a steady stream of searches cannot starve the index catch-up;
and when a writer releases the lock, the readers already waiting go in before the next
writer, so a catch-up writing chunk after chunk cannot starve the searches either (each waits
for at most the chunk being written).

``read_now`` takes the lock shared only if that needs no wait, for callers that have
somewhere better to wait than a lock (the event loop hands the search to a thread instead).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WouldBlock(Exception):
    """The lock could not be taken without waiting (``RWLock.read_now``)."""


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers, and the readers
    waiting when a writer releases go before the next writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._readers_turn = False

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared."""
        with self._cond:
            self._waiting_readers += 1
            try:
                while self._writer or (self._waiting_writers and not self._readers_turn):
                    self._cond.wait()
            finally:
                self._waiting_readers -= 1
                if not self._waiting_readers and self._readers_turn:
                    # Every reader let in by the last writer is in (or gave up): writers next.
                    self._readers_turn = False
                    self._cond.notify_all()
            self._readers += 1
        try:
            yield
        finally:
            self._release_read()

    @contextmanager
    def read_now(self) -> Iterator[None]:
        """Hold the lock shared if no writer holds it or waits for it.

        Raises:
            WouldBlock: a writer holds the lock or is waiting (readers never barge past one).
        """
        with self._cond:
            if self._writer or self._waiting_writers:
                raise WouldBlock
            self._readers += 1
        try:
            yield
        finally:
            self._release_read()

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively."""
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers or self._readers_turn:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._readers_turn = self._waiting_readers > 0
                self._cond.notify_all()
