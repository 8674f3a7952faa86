"""Searches run on the event loop only while the index is free.

MatchFace and MatchPlate search on the event loop (a search is far cheaper than the trip to
a thread). While a writer holds the index (an import, a catch-up) a search must wait for it
in the executor, never on the loop: other calls go on being answered meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from centinela.matcher.service import WATCHLIST
from centinela.server.demo import PLATE, World, serving_world
from centinela.server.match_service import SearchPlacement
from centinela.v1 import match_service_pb2 as mpb


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_world(tmp_path_factory.mktemp("inline"), registry=False) as w:
        yield w


def _record_waits(matcher: Any) -> list[bool]:
    """Record the ``wait`` of every face search from now on (until ``del matcher.search_faces``):
    False when it ran on the loop, True when in the executor."""
    calls: list[bool] = []
    original = matcher.search_faces

    def search_faces(*args: Any, **kw: Any) -> Any:
        calls.append(kw.get("wait", True))
        return original(*args, **kw)

    matcher.search_faces = search_faces
    return calls


def _hold(lock: AbstractContextManager[Any]) -> tuple[threading.Event, threading.Event]:
    """Hold ``lock`` in a thread until the returned ``release`` is set."""
    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with lock:
            held.set()
            release.wait(60)

    threading.Thread(target=run, daemon=True).start()
    assert held.wait(10)
    return held, release


@pytest.mark.parametrize("kind", ["face", "plate"])
def test_a_search_behind_a_writer_waits_off_the_loop(world: World, kind: str) -> None:
    matcher = world.server.app.components.matcher
    index = matcher.gallery(WATCHLIST) if kind == "face" else matcher.plates
    stub = world.stub("muni-miraflores")
    _, release = _hold(index._rw.write())
    pending: Any
    try:
        if kind == "face":
            pending = stub.MatchFace.future(world.face_request(world.genuine(0)), timeout=60)
        else:
            pending = stub.MatchPlate.future(world.plate_request(PLATE), timeout=60)
        # Wait until the search is queued behind the writer, wherever it waits.
        for _ in range(1000):
            with index._rw._cond:
                if index._rw._waiting_readers:
                    break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the search never waited for the writer")
        # The loop is free: another call is answered while the search waits for the writer.
        info = stub.GetServerInfo(mpb.GetServerInfoRequest(), timeout=10)
        assert info.galleries
        assert not pending.done()
    finally:
        release.set()
    answer = pending.result(timeout=60)
    assert answer.alert  # the search ran, once the writer was done


def test_searches_take_the_loop_when_the_index_is_free(world: World) -> None:
    # Fails if the inline path is broken (e.g. a search that no longer accepts wait=False
    # would fall back or fail): a free index is searched without an executor thread.
    matcher = world.server.app.components.matcher
    calls = _record_waits(matcher)
    try:
        resp = world.stub("muni-miraflores").MatchFace(
            world.face_request(world.genuine(0)), timeout=30
        )
    finally:
        del matcher.search_faces
    assert resp.alert
    assert calls == [False]


def test_placement_moves_costly_searches_off_the_loop_and_keeps_measuring() -> None:
    placement = SearchPlacement(max_inline_s=0.001, probe_every=4)
    assert placement.inline()  # nothing measured yet: try the loop
    placement.record(0.0002)
    assert all(placement.inline() for _ in range(10))
    for _ in range(50):  # the index grew: searches got slow
        placement.record(0.005)
    decisions = [placement.inline() for _ in range(12)]
    assert decisions.count(True) == 3  # one in four still measures on the loop
    for _ in range(50):  # and it got cheap again
        placement.record(0.0001)
    assert all(placement.inline() for _ in range(10))


def test_a_costly_search_runs_beside_the_loop(world: World) -> None:
    matcher = world.server.app.components.matcher
    servicer = world.server.app.servicers.match
    calls = _record_waits(matcher)
    placement = servicer.placement[f"search_faces:{WATCHLIST}"]
    saved = placement.cost_s, placement.probe_every
    placement.cost_s = 1.0  # as if a search took a second
    placement.probe_every = 10**9  # and no re-measuring on the loop in this test
    try:
        resp = world.stub("muni-miraflores").MatchFace(
            world.face_request(world.genuine(0)), timeout=30
        )
    finally:
        del matcher.search_faces
        placement.cost_s, placement.probe_every = saved
    assert resp.alert
    assert calls == [True]  # in the executor, waiting as a reader may
