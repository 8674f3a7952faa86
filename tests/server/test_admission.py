"""The adaptive in-flight limit (``centinela.server.admission.InFlight``), unit by unit.

The limit is driven with the elapsed times it is told, so each window's mean is exact; the
windows' minimum duration is set to 0 so a window closes after ``WINDOW_UNITS`` completions.
The live behaviour under load is measured by ``benchmarks/load.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from centinela.config import Settings
from centinela.errors import ConfigError, ResourceExhausted
from centinela.server.admission import (
    MAX_PENDING_HARD,
    MAX_STREAMS,
    InFlight,
    server_options,
)


def _limiter(ceiling: int = 256, target_s: float = 0.1, floor: int = 32) -> InFlight:
    f = InFlight(ceiling, target_s=target_s, floor=floor)
    f.WINDOW_S = 0.0
    return f


def _window(f: InFlight, elapsed_s: float, *, saturate: bool) -> None:
    """One window of completions, each ``elapsed_s``; with ``saturate`` demand fills the
    limit first (the units beyond it are shed)."""
    held = 0
    want = f.limit + 5 if saturate else min(f.WINDOW_UNITS, f.limit - 1)
    shed = 0
    for _ in range(want):
        try:
            f.enter()
            held += 1
        except ResourceExhausted:
            shed += 1
    assert held <= f.limit
    assert shed == (5 if saturate else 0)
    done = 0
    while done < f.WINDOW_UNITS:
        if held == 0:
            f.enter()
            held += 1
        f.leave(elapsed_s)
        held -= 1
        done += 1
    for _ in range(held):
        f.count -= 1  # the rest finish in the next window, unobserved


def test_slow_windows_shrink_the_limit_to_the_floor_and_no_further() -> None:
    f = _limiter()
    limits = []
    for _ in range(20):
        _window(f, 0.5, saturate=True)
        limits.append(f.limit)
    assert limits[0] == 192  # a quarter off
    assert limits == sorted(limits, reverse=True)
    assert limits[-1] == 32


def test_fast_windows_under_demand_grow_it_back_to_the_ceiling() -> None:
    f = _limiter()
    for _ in range(20):
        _window(f, 0.5, saturate=True)
    assert f.limit == 32
    limits = []
    for _ in range(40):
        _window(f, 0.01, saturate=True)
        limits.append(f.limit)
    assert limits[0] == 36  # an eighth more
    assert limits == sorted(limits)
    assert limits[-1] == 256


def test_fast_windows_without_demand_leave_it_alone() -> None:
    f = _limiter()
    for _ in range(20):
        _window(f, 0.5, saturate=True)
    for _ in range(10):
        _window(f, 0.01, saturate=False)
    assert f.limit == 32


def test_target_zero_keeps_the_ceiling_fixed() -> None:
    f = _limiter(target_s=0.0)
    for _ in range(10):
        _window(f, 5.0, saturate=True)
    assert f.limit == 256


def test_a_window_needs_its_minimum_duration() -> None:
    clock = [1000.0]
    f = InFlight(256, target_s=0.1, clock=lambda: clock[0])  # WINDOW_S as shipped
    for _ in range(4 * f.WINDOW_UNITS):  # many slow completions, all in the same instant
        f.enter()
        f.leave(1.0)
    assert f.limit == 256
    clock[0] += f.WINDOW_S
    f.enter()
    f.leave(1.0)
    assert f.limit == 192


def test_a_floor_above_the_ceiling_is_the_ceiling() -> None:
    f = _limiter(ceiling=4)
    assert (f.limit, f.floor) == (4, 4)
    for _ in range(3):
        f.enter()
    f.enter()
    with pytest.raises(ResourceExhausted):
        f.enter()
    f.leave()
    f.enter()


def test_stream_probes_wait_in_order_and_a_cancelled_waiter_leaks_nothing() -> None:

    async def scenario() -> None:
        f = InFlight(2, floor=2)
        f.enter()
        f.enter()
        got: list[str] = []

        async def probe(name: str) -> None:
            await f.acquire(stream=True)
            got.append(name)

        first = asyncio.create_task(probe("first"))
        gone = asyncio.create_task(probe("gone"))
        last = asyncio.create_task(probe("last"))
        await asyncio.sleep(0)
        assert (f.count, f.waiting) == (2, 3)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert f.waiting == 2
        f.leave()  # one unit frees: the first waiter takes it
        await first
        assert got == ["first"]
        assert f.count == 2
        f.leave()
        await last
        assert got == ["first", "last"]
        assert (f.count, f.waiting) == (2, 0)
        f.leave()
        f.leave()
        assert f.count == 0
        # Handed a unit at the moment it is cancelled: the unit is given back.
        f.enter()
        f.enter()
        racing = asyncio.create_task(f.acquire(stream=True))
        await asyncio.sleep(0)
        f.leave()  # hands the unit to `racing` (its future is done, the task not yet run)
        racing.cancel()
        await asyncio.gather(racing, return_exceptions=True)
        assert f.count == 1

    asyncio.run(scenario())


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_units_go_round_robin_to_the_callers_that_wait() -> None:
    """A flood's hundred waiting calls cost a client with two waiting one turn each, not the
    hundred: freed units alternate between the callers that wait (FIFO within one)."""

    async def scenario() -> None:
        f = InFlight(2, floor=2, max_wait_s=60.0, queue_per_caller=1000)
        f.enter()
        f.enter()
        order: list[str] = []

        async def call(caller: str, n: int) -> None:
            await f.acquire(caller)
            order.append(f"{caller}{n}")

        tasks = [asyncio.create_task(call("flood", n)) for n in range(100)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("portico", n)) for n in range(2)]
        tasks += [asyncio.create_task(call("other", n)) for n in range(1)]
        await asyncio.sleep(0)
        assert (f.waiting, f.waiting_for("flood"), f.waiting_for("portico")) == (103, 100, 2)
        for _ in range(103):
            f.leave()  # one unit frees, one waiter is handed it
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order[:6] == ["flood0", "portico0", "other0", "flood1", "portico1", "flood2"]
        assert order[6:] == [f"flood{n}" for n in range(3, 100)]
        assert (f.count, f.waiting) == (2, 0)

    _run(scenario)


def test_a_call_waits_at_most_max_wait_and_a_callers_queue_is_bounded() -> None:
    async def scenario() -> None:
        f = InFlight(1, floor=1, max_wait_s=0.05, queue_per_caller=2)
        f.enter()
        waiting = [asyncio.create_task(f.acquire("flood")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="already has 2 calls waiting"):
            await f.acquire("flood")  # its queue is full: refused at once
        other = asyncio.create_task(f.acquire("portico"))  # another caller's is not
        await asyncio.sleep(0)
        assert (f.waiting, f.waiting_for("portico")) == (3, 1)
        results = await asyncio.gather(*waiting, other, return_exceptions=True)
        assert all(isinstance(r, ResourceExhausted) and "waited 50 ms" in str(r) for r in results)
        assert (f.count, f.waiting) == (1, 0)  # nothing handed out, nothing left queued
        f.leave()
        await f.acquire("flood")  # below the limit again: at once
        assert f.count == 1

    _run(scenario)


def test_no_wait_refuses_at_the_limit_and_a_stream_probe_ignores_the_bounds() -> None:
    async def scenario() -> None:
        f = InFlight(1, floor=1, max_wait_s=0.0, queue_per_caller=1)
        await f.acquire("a")
        with pytest.raises(ResourceExhausted, match="concurrency limit"):
            await f.acquire("a")
        probes = [asyncio.create_task(f.acquire("a", stream=True)) for _ in range(3)]
        await asyncio.sleep(0)
        assert f.waiting_for("a") == 3  # past queue_per_caller, and no timer
        with pytest.raises(ResourceExhausted):
            f.enter()  # nobody jumps a queue that waits
        for task in probes:
            f.leave()
            await task
        assert (f.count, f.waiting) == (1, 0)

    _run(scenario)


def test_a_waiter_cancelled_or_expired_gives_back_nothing_it_did_not_take() -> None:
    async def scenario() -> None:
        f = InFlight(1, floor=1, max_wait_s=60.0)
        f.enter()
        gone = asyncio.create_task(f.acquire("a"))
        kept = asyncio.create_task(f.acquire("b"))
        await asyncio.sleep(0)
        gone.cancel()  # cancelled, its task not yet resumed: the hand-over skips it
        f.leave()
        await asyncio.gather(gone, return_exceptions=True)
        await kept
        assert (f.count, f.waiting) == (1, 0)
        # Handed a unit at the moment its call is cancelled: the unit comes back.
        racing = asyncio.create_task(f.acquire("a"))
        await asyncio.sleep(0)
        f.leave()
        racing.cancel()
        await asyncio.gather(racing, return_exceptions=True)
        assert (f.count, f.waiting) == (0, 0)

    _run(scenario)


def test_server_options_carry_the_bounds_and_refuse_bad_ones(tmp_path: Path) -> None:
    base = Settings(data_dir=tmp_path)
    options = dict(server_options(base))
    assert options[MAX_STREAMS] == base.max_streams_per_connection == 100
    assert options[MAX_PENDING_HARD] == base.max_pending_rpcs
    unlimited = dict(server_options(Settings(data_dir=tmp_path, max_streams_per_connection=0)))
    assert MAX_STREAMS not in unlimited  # gRPC's own default: no limit
    for bad in (
        {"max_streams_per_connection": -1},
        {"max_pending_rpcs": 1},
        {"max_concurrent_rpcs": 0},
        {"admission_max_wait_ms": -1.0},
        {"admission_queue_per_caller": 0},
    ):
        with pytest.raises(ConfigError):
            server_options(Settings(data_dir=tmp_path, **bad))
