"""``RWLock.read_now``: a shared hold that never waits, for the event loop's searches."""

from __future__ import annotations

import threading

import pytest

from centinela.matcher.rwlock import RWLock, WouldBlock


def test_read_now_shares_with_readers() -> None:
    lock = RWLock()
    with lock.read(), lock.read_now(), lock.read_now():
        pass
    with lock.write():  # every shared hold was given back
        pass


def test_read_now_refuses_while_a_writer_holds_the_lock() -> None:
    lock = RWLock()
    with lock.write(), pytest.raises(WouldBlock), lock.read_now():
        pass
    with lock.read_now():  # free again
        pass


def test_read_now_does_not_barge_past_a_waiting_writer() -> None:
    lock = RWLock()
    writer_waiting = threading.Event()
    done = threading.Event()

    def write() -> None:
        writer_waiting.set()
        with lock.write():
            done.set()

    with lock.read():
        t = threading.Thread(target=write)
        t.start()
        writer_waiting.wait(10)
        # Wait until the writer is registered as waiting (it blocks on our shared hold).
        for _ in range(1000):
            with lock._cond:
                if lock._waiting_writers:
                    break
            threading.Event().wait(0.01)
        with pytest.raises(WouldBlock), lock.read_now():
            pass
        assert not done.is_set()
    t.join(10)
    assert done.is_set()
