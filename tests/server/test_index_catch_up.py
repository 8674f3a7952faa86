"""The index catch-up leaves room to the searches and to the import (real hnswlib, SQLite)."""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable
from pathlib import Path

from centinela.matcher.gallery import FaceGallery
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.rwlock import RWLock
from centinela.matcher.service import REGISTRY, Matcher, default_galleries
from centinela.matcher.store import TemplateColumns, TemplateStore
from centinela.matcher.synth import identities
from centinela.storage import make_engine


def _wait_for(check: Callable[[], bool]) -> None:
    """Poll until ``check()`` (threads reach their waiting point; no timing is asserted)."""
    for _ in range(20_000):
        if check():
            return
        threading.Event().wait(0.001)
    raise AssertionError("the threads never reached the expected state")


def test_searches_waiting_for_a_chunk_go_before_the_next_chunk() -> None:
    """A catch-up writes chunk after chunk; a search waiting meanwhile gets in between."""
    lock = RWLock()
    order: list[str] = []

    def search() -> None:
        with lock.read():
            order.append("search")

    def next_chunk() -> None:
        with lock.write():
            order.append("next chunk")

    chunk = lock.write()
    chunk.__enter__()
    searcher = threading.Thread(target=search)
    searcher.start()
    _wait_for(lambda: lock._waiting_readers == 1)
    writer = threading.Thread(target=next_chunk)
    writer.start()
    _wait_for(lambda: lock._waiting_writers == 1)
    chunk.__exit__(None, None, None)
    searcher.join()
    writer.join()
    assert order == ["search", "next chunk"]


def test_a_waiting_writer_still_holds_new_searches_off() -> None:
    """Searches arriving while a writer waits do not starve it."""
    lock = RWLock()
    order: list[str] = []
    first = lock.read()
    first.__enter__()

    def write() -> None:
        with lock.write():
            order.append("chunk")

    def later_search() -> None:
        with lock.read():
            order.append("later search")

    writer = threading.Thread(target=write)
    writer.start()
    _wait_for(lambda: lock._waiting_writers == 1)
    reader = threading.Thread(target=later_search)
    reader.start()
    _wait_for(lambda: lock._waiting_readers == 1)
    first.__exit__(None, None, None)
    writer.join()
    reader.join()
    assert order == ["chunk", "later search"]


def test_adaptive_chunks_insert_everything_searchable() -> None:
    vecs = identities(300, 32, seed=5)
    g = FaceGallery("g", "m", 32, M=8, ef_construction=40, num_threads=2)
    added = g.add_batch(
        [f"t{i}" for i in range(300)], [f"s{i}" for i in range(300)], vecs, max_hold_s=1e-6
    )
    assert added == len(g) == 300
    hits = g.search(vecs[123], k=1, min_score=0.99, now=dt.datetime.now(dt.UTC))
    assert [h.template_id for h in hits] == ["t123"]


def test_background_insertion_runs_below_the_server_threads(tmp_path: Path) -> None:
    """hnswlib inserts from a low-priority thread; the catch-up's Python work (it holds the
    GIL) and the server's threads keep normal priority."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    store = TemplateStore(engine, FileKeyProvider(tmp_path / "keys"))
    matcher = Matcher(store, galleries=default_galleries("m", 16))
    matcher.start()
    matcher.run_in_background(interval_s=0.05)
    try:
        dnis = [f"4000000{i}" for i in range(5)]
        store.add_templates(
            "reniec", REGISTRY, "m", TemplateColumns.for_dnis(identities(5, 16, seed=6), dnis)
        )
        matcher.notify()
        _wait_for(lambda: len(matcher.gallery(REGISTRY)) == 5)
        inserters = [t for t in threading.enumerate() if t.name.startswith("matcher-insert")]
        assert inserters
        for t in inserters:
            assert t.native_id is not None
            assert os.getpriority(os.PRIO_PROCESS, t.native_id) == matcher.hnsw.catch_up_nice
        catch_up = matcher._thread
        assert catch_up is not None
        assert catch_up.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, catch_up.native_id) == 0
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    finally:
        matcher.stop()
        engine.dispose()
