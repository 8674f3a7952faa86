"""The adaptive in-flight limit (``centinela.server.admission.InFlight``), unit by unit.

The limit is driven by a model of the service on a clock of the test's own (:class:`Service`),
so each window's times and rate are exact. The live behaviour under load is measured by
``benchmarks/load.py``.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from centinela.config import Settings
from centinela.errors import ConfigError, DeadlineExceeded, ResourceExhausted
from centinela.server.admission import (
    MAX_PENDING_HARD,
    MAX_STREAMS,
    InFlight,
    server_options,
)


class Service:
    """A model of the server for the limit to drive, on a clock of its own: units in flight
    share a CPU that completes ``capacity`` units a second, and none takes less than
    ``unloaded_s`` (one decision with its audit commit, alone). Demand is saturated: each of
    ``callers`` (two, so that the limit binds) replaces every probe of its that completes at
    once, up to its share of the limit (or up to ``demand`` probes, a portico's streams);
    the oldest unit completes first. No wall clock is involved."""

    def __init__(
        self,
        limiter: InFlight,
        clock: list[float],
        capacity: float,
        unloaded_s: float,
        callers: tuple[str, ...] = ("flood", "muni"),
        demand: int | None = None,
        orgs: dict[str, str] | None = None,
    ):
        self.f = limiter
        self.clock = clock
        self.capacity = capacity
        self.unloaded_s = unloaded_s
        self.callers = callers
        self.demand = demand
        self.orgs = orgs or {}  # each caller's organisation (by default one of its own)
        self.units: collections.deque[str] = collections.deque()  # whose, oldest first
        self.times: list[float] = []  # each completed unit's time in the service
        self.done: collections.Counter[str] = collections.Counter()  # completions by caller

    def fill(self) -> None:
        for caller in self.callers:
            while self.demand is None or self.f.held_by(caller) < self.demand:
                try:
                    self.f.enter(caller, org=self.orgs.get(caller), stream=True)
                except ResourceExhausted:
                    break
                self.units.append(caller)

    def serve(self, seconds: float) -> list[int]:
        """Run for ``seconds`` of model time; the limit after each completion."""
        limits = []
        end = self.clock[0] + seconds
        self.fill()
        while self.clock[0] < end:
            in_flight = self.f.count
            elapsed = max(self.unloaded_s, in_flight / self.capacity)
            self.clock[0] += elapsed / in_flight  # in_flight units complete per `elapsed`
            caller = self.units.popleft()
            self.f.leave(elapsed, stream=True, caller=caller)
            self.done[caller] += 1
            self.times.append(elapsed)
            self.fill()
            limits.append(self.f.limit)
        return limits


def _service(
    capacity: float = 600.0, unloaded_s: float = 0.003, *, ceiling: int = 256, floor: int = 4
) -> Service:
    clock = [1000.0]
    f = InFlight(ceiling, gain=2.0, floor=floor, clock=lambda: clock[0])
    return Service(f, clock, capacity, unloaded_s)


def test_the_first_window_probes_at_the_floor_then_the_limit_is_gain_x_rate_x_time() -> None:
    """One core serving 600/s, 3 ms unloaded: at the floor (4 units) the CPU is already the
    bottleneck, each unit takes 4/600 s; the limit becomes 2 x 600/s x 6.7 ms = 8, not the 256
    a limit that only watched its mean time against 100 ms would keep."""
    s = _service()
    s.serve(0.3)  # the first window (at the ceiling) ends within 0.3 s
    assert (s.f.probing, s.f.limit) == (True, 4)
    limits = s.serve(5.0)
    assert s.f.unloaded_s == pytest.approx(4 / 600)
    assert s.f.rate == pytest.approx(600, rel=0.01)
    assert s.f.limit == 8
    assert limits[-1000:] == [8] * 1000  # settled, no oscillation
    # The time each unit spends in the service: 8/600 s, twice the floor's (the gain).
    assert s.times[-1] == pytest.approx(2 * 4 / 600)


def test_where_the_audit_commit_is_slow_the_limit_grows_to_keep_the_rate() -> None:
    """30 ms unloaded (a distant database), the same CPU: the floor completes only
    4/30 ms = 133/s, so the limit doubles window by window while the time stays 30 ms, and
    settles at 2 x 600/s x 30 ms = 36, where the CPU is busy and the time is 60 ms."""
    s = _service(unloaded_s=0.030)
    s.serve(0.3)
    assert s.f.limit == 4  # probing
    limits = s.serve(10.0)
    grown = sorted(set(limits))
    assert grown[:4] == [4, 8, 16, 32]  # at most twice per window
    assert s.f.unloaded_s == pytest.approx(0.030)
    assert s.f.limit == 36
    assert s.f.rate == pytest.approx(600, rel=0.01)
    assert s.times[-1] == pytest.approx(36 / 600)


def test_a_stale_unloaded_time_is_measured_again_at_the_floor() -> None:
    """Under a steady load no window comes in under the unloaded time, so every PROBE_S the
    limit drains to the floor for one window. A service that has become slower (the
    database, say) is measured afresh there, and the limit follows it."""
    s = _service()
    s.serve(5.0)
    assert s.f.limit == 8
    s.unloaded_s = 0.030  # the audit commit slows down
    limits = s.serve(s.f.PROBE_S + 10.0)
    probes = [n for n in range(1, len(limits)) if limits[n] == 4 and limits[n - 1] != 4]
    assert len(probes) >= 1
    assert s.f.unloaded_s == pytest.approx(0.030)
    assert s.f.limit == 36
    # Back at the old speed: 36 units still share the CPU (60 ms each), so no window comes in
    # under 30 ms; the next probe finds the speed and the limit comes back down.
    s.unloaded_s = 0.003
    s.serve(2.0)
    assert s.f.limit == 36
    s.serve(s.f.PROBE_S)
    assert s.f.unloaded_s == pytest.approx(4 / 600, rel=0.01)
    assert s.f.limit == 8


class _TwoOrgs:
    """A flood and a portico of two organisations, one probe at a time, each completing
    ``elapsed_s`` after it started, 5 ms of the limiter's clock apart (the portico every
    tenth). Probes complete at once: the limit never binds here, only its estimates move."""

    def __init__(self) -> None:
        self.clock = [1000.0]
        self.f = InFlight(256, gain=2.0, floor=2, clock=lambda: self.clock[0])
        self.steps = 0
        # A call each: two callers, nothing measured ...
        _call_once(self.f, [("portico", "miraflores"), ("flood", "la-victoria")])
        assert self.f.probing  # ... so the unloaded time is measured at once

    def complete(self, elapsed_s: float, n: int = 1) -> None:
        for _ in range(n):
            self.clock[0] += 0.005
            self.steps += 1
            portico = self.steps % 10 == 0
            caller, org = ("portico", "miraflores") if portico else ("flood", "la-victoria")
            self.f.enter(caller, org=org, stream=True)
            self.f.leave(elapsed_s, stream=True, caller=caller)

    def until_remeasured(
        self, elapsed_s: float, seconds: float, shrink: float = 0.0
    ) -> float | None:
        """Completions of ``elapsed_s`` (each ``shrink`` shorter than the last, as a limit
        coming down shortens them) until a remeasuring starts; how long that took."""
        start = self.clock[0]
        while self.clock[0] < start + seconds:
            self.complete(elapsed_s)
            elapsed_s *= 1.0 - shrink
            if self.f.probing:
                return self.clock[0] - start
        return None


def test_loaded_windows_under_the_unloaded_time_do_not_put_off_the_remeasuring() -> None:
    """A remeasuring window can come out high: streams opening at a phase's start gave one
    of 11 ms where the service takes 2.5 (fairness.py, session 19). With the flood's
    organisation at half the limit that sets, loaded windows come in just under 11 ms; when
    each of them counted as a fresh measurement, the limit stood at 10-15 for the whole
    phase. They may lower the figure, but the next remeasuring comes ``PROBE_S`` after the
    last one."""
    m = _TwoOrgs()
    m.complete(0.011, 100)  # the remeasuring window, noisy (nothing before it to confirm)
    assert not m.f.probing
    assert m.f.unloaded_s == pytest.approx(0.011)
    # Loaded windows, each a little under the last (10 ms, down to 8.2 in 10 s).
    took = m.until_remeasured(0.010, 2 * m.f.PROBE_S, shrink=1e-4)
    assert m.f.unloaded_s is not None
    assert 0.008 < m.f.unloaded_s < 0.0095  # lowered by them
    assert took == pytest.approx(m.f.PROBE_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.0025, 100)  # the service's real unloaded time, at the floor
    assert not m.f.probing
    assert m.f.unloaded_s == pytest.approx(0.0025)


def test_a_rise_of_the_unloaded_time_is_taken_only_once_a_second_measurement_agrees() -> None:
    """A remeasuring that comes out more than ``RISE`` times the value is not taken: it is
    measured again ``CONFIRM_S`` later, not ``PROBE_S``, until two measurements in a row
    agree (within ``RISE``; the lower is taken) or one is back near the value. At the start
    of a flood one came out at 11 ms where the service took 2.5, its confirmation at 7 ms,
    and the limit those set stood for ten seconds (fairness.py, session 19). A service
    that has really become slower is followed once confirmed."""
    m = _TwoOrgs()
    m.complete(0.0025, 100)
    assert m.f.unloaded_s == pytest.approx(0.0025)
    limit = m.f.limit
    assert m.until_remeasured(0.004, 2 * m.f.PROBE_S) is not None

    def confirmed_after() -> float | None:
        return m.until_remeasured(0.030, 2 * m.f.PROBE_S)  # loaded windows, none under

    m.complete(0.011, 100)  # noisy: not taken, and the limit stays where it was
    assert m.f.unloaded_s == pytest.approx(0.0025)
    assert m.f.limit == limit
    assert confirmed_after() == pytest.approx(m.f.CONFIRM_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.007, 100)  # still high, but not in agreement: measured again
    assert m.f.unloaded_s == pytest.approx(0.0025)
    assert m.f.limit == limit
    assert confirmed_after() == pytest.approx(m.f.CONFIRM_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.0026, 100)  # back near the value: taken, next measured PROBE_S later
    assert m.f.unloaded_s == pytest.approx(0.0026)
    assert confirmed_after() == pytest.approx(m.f.PROBE_S, abs=2 * m.f.WINDOW_S)

    m.complete(0.011, 100)  # a real rise: not taken yet ...
    assert m.f.unloaded_s == pytest.approx(0.0026)
    assert confirmed_after() == pytest.approx(m.f.CONFIRM_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.0118, 100)  # ... the second measurement agrees: the lower is taken
    assert m.f.unloaded_s == pytest.approx(0.011)
    assert m.f.limit > limit
    assert confirmed_after() == pytest.approx(m.f.PROBE_S, abs=2 * m.f.WINDOW_S)

    # A time that keeps climbing never agrees with the last: after CONFIRMS measurements
    # more the lower of the last two is taken.
    for k, mean in enumerate((0.020, 0.030, 0.045, 0.070)):
        m.complete(mean, 100)
        assert m.f.unloaded_s == pytest.approx(0.011), k
        assert confirmed_after() == pytest.approx(m.f.CONFIRM_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.100, 100)
    assert m.f.unloaded_s == pytest.approx(0.070)

    # A rise the clients stopped competing before confirming is forgotten: a measurement
    # much later that happens to agree with it is itself only a rise to confirm.
    took = m.until_remeasured(0.300, 2 * m.f.PROBE_S)  # loaded windows, none under 70 ms
    assert took == pytest.approx(m.f.PROBE_S, abs=2 * m.f.WINDOW_S)
    m.complete(0.150, 100)
    assert m.f.unloaded_s == pytest.approx(0.070)
    m.clock[0] += 30 * m.f.PROBE_S  # nobody calls for five minutes
    assert m.until_remeasured(0.300, 2 * m.f.PROBE_S) is not None
    m.complete(0.155, 100)
    assert m.f.unloaded_s == pytest.approx(0.070)


def test_a_probe_window_starts_only_once_the_units_have_drained_to_the_floor() -> None:
    clock = [1000.0]
    f = InFlight(256, gain=2.0, floor=4, clock=lambda: clock[0])
    for _ in range(64):
        f.enter("flood", stream=True)  # alone: held at the ceiling only
    assert (f.probing, f.limit) == (False, 256)
    f.enter("muni")  # a second caller, and nothing measured yet: the probe starts
    assert (f.probing, f.limit, f.share()) == (True, 4, 2)
    # Loaded completions while the flood's 64 drain to its share of the floor (2) do not
    # count toward the probe's window.
    for _ in range(62):
        clock[0] += 0.1
        f.leave(1.0, stream=True, caller="flood")
    assert (f.probing, f.unloaded_s) == (True, None)
    for _ in range(2 * f.WINDOW_UNITS):
        clock[0] += 0.01
        f.leave(0.004, stream=True, caller="flood")
        f.enter("flood", stream=True)
        f.leave()  # the other caller's call, which keeps it active
        f.enter("muni")
    assert not f.probing
    assert f.unloaded_s == pytest.approx(0.004)


def test_a_lone_caller_is_held_at_the_ceiling_and_shares_the_limit_with_a_second() -> None:
    """The adaptive limit protects other callers from one that floods over streams: while
    there is nobody else to protect it does not hold probes at all, so a single client with
    many probes outstanding keeps its throughput (session 16: held at the limit alone, 20-40 %
    less). A second active caller makes each one's share the limit over the callers."""
    clock = [1000.0]
    s = Service(
        InFlight(256, gain=2.0, floor=4, clock=lambda: clock[0]),
        clock,
        600.0,
        0.003,
        callers=("gateway",),
    )
    assert set(s.serve(5.0)) == {256}
    assert (s.f.count, s.f.probing, s.f.unloaded_s) == (256, False, None)
    s.callers = ("gateway", "muni")
    s.serve(2.0)  # the second caller starts the probe; the limit settles as in the first test
    assert s.f.limit == 8
    assert (s.f.share(), s.f.held_by("gateway"), s.f.held_by("muni")) == (4, 4, 4)
    # The second caller goes quiet: ACTIVE_S later the gateway is alone again.
    s.callers = ("gateway",)
    s.serve(s.f.ACTIVE_S + 0.5)
    assert (s.f.active, s.f.share(), s.f.held_by("gateway")) == (1, 256, 256)
    # A probe the probe window had started is dropped when its second caller goes.
    s.f.probing, s.f.limit = True, s.f.floor
    s.serve(1.0)
    assert (s.f.probing, s.f.held_by("gateway")) == (False, 256)


def test_gain_zero_keeps_the_ceiling_fixed() -> None:
    clock = [1000.0]
    s = Service(InFlight(256, gain=0.0, clock=lambda: clock[0]), clock, 600.0, 0.003)
    assert set(s.serve(5.0)) == {256}
    assert s.f.unloaded_s is None


def test_many_porticos_each_under_its_floor_are_not_held_but_to_remeasure() -> None:
    """The everyday national case: many porticos, each with its own certificate and two
    streams, together beyond what the service needs in flight. The shares must not hold a
    portico that stays within the floor, except in the remeasuring window, and the service
    must keep every portico served (round robin), its rate that of the CPU."""
    clock = [1000.0]
    porticos = tuple(f"portico-{n}" for n in range(19))
    s = Service(
        InFlight(256, gain=2.0, floor=2, clock=lambda: clock[0]),
        clock,
        600.0,
        0.003,
        callers=porticos,
        demand=2,
    )
    s.serve(1.0)  # the first remeasuring comes with the second caller
    completed = len(s.times)
    held_back = 0
    start = clock[0]
    for _ in range(200):
        s.serve(0.1)
        if s.f.count < 2 * len(porticos) and not s.f.probing:
            held_back += 1
    assert s.f.active == 19
    assert held_back == 0  # outside the remeasuring windows every portico has both probes
    rate = (len(s.times) - completed) / (clock[0] - start)
    assert rate == pytest.approx(600.0, rel=0.02)
    assert s.f.limit < 38  # the limit alone would hold them: the floor per caller does not
    assert min(s.done.values()) >= 0.95 * max(s.done.values())  # each portico its turn


def test_each_caller_keeps_the_floor_but_for_the_remeasuring_window() -> None:
    """A portico holds two streams; with the limit at its floor of 2 and two callers, an
    equal part of 1 would make its second probe wait for its first (seen at 1x, session 17).
    Each caller keeps the floor, except while the unloaded time is remeasured, when the
    callers share the floor so that the window runs near it in total."""
    f = InFlight(256, gain=2.0, floor=2, clock=lambda: 0.0)
    f.enter("portico")
    assert f.share() == 256  # alone: the ceiling
    f.enter("flood")  # a second caller, nothing measured yet: remeasure at the floor
    assert (f.probing, f.limit, f.share()) == (True, 2, 1)
    f.probing = False
    assert f.share() == 2  # the floor, not 2 // 2
    f.limit = 12
    assert f.share() == 6
    f.enter("officer")
    assert f.share() == 4
    f.limit = 256
    assert f.share() == 256  # a limit at the ceiling holds nobody


def test_an_organisation_shares_the_limit_as_one_caller_however_many_certificates() -> None:
    """Certificates are cheap for the organisation that holds them: a client that spreads a
    flood over 19 certificates of its organisation took 19 floors of the limit (38 probes
    beside the porticos' 38: 24x their p50, docs/performance.md session 18). So an
    organisation's certificates share, together, an equal part of the limit with the other
    active organisations' (at least the floor), each certificate still within its own share;
    an organisation alone is not held as one (its certificates' shares are as before)."""
    f = InFlight(256, gain=2.0, floor=2, clock=lambda: 0.0)
    for k in range(3):
        f.enter(f"portico-{k}", org="miraflores")
    assert (f.active, f.orgs, f.org_share()) == (3, 1, 256)  # one organisation
    f.enter("flood-0", org="la-victoria")  # a second organisation, nothing measured yet
    assert (f.orgs, f.probing, f.org_share()) == (2, True, 1)  # the remeasuring window
    f.probing = False
    f.limit = 12
    assert (f.share(), f.org_share()) == (3, 6)
    for k in range(1, 19):
        f.enter(f"flood-{k}", org="la-victoria")
    assert (f.active, f.orgs, f.share(), f.org_share()) == (22, 2, 2, 6)
    taken = 0
    for k in range(19):
        for _ in range(2):  # each flood certificate asks for its floor
            try:
                f.enter(f"flood-{k}", org="la-victoria", stream=True)
                taken += 1
            except ResourceExhausted:
                pass
    assert (taken, f.held_by_org("la-victoria"), f.most_held) == (6, 6, 2)
    f.enter("portico-0", org="miraflores", stream=True)  # the other organisation's part
    f.enter("portico-0", org="miraflores", stream=True)
    assert (f.held_by_org("miraflores"), f.streams) == (2, 8)
    for k in range(3):
        f.leave(stream=True, caller=f"flood-{k}")
        f.leave(stream=True, caller=f"flood-{k}")
    f.leave(stream=True, caller="portico-0")
    f.leave(stream=True, caller="portico-0")
    assert (f.streams, f.most_held_by_org) == (0, 0)
    assert f._org_held == {}  # nothing left behind


def test_a_flood_over_many_certificates_of_one_organisation_keeps_its_share() -> None:
    """19 certificates of one organisation, each with its floor of probes, beside 19
    porticos of another (all saturated here): the limit holds each organisation at its
    part, so the units in flight, and each one's time in the service, stay near the
    unloaded figure; the two organisations complete alike."""
    clock = [1000.0]
    porticos = tuple(f"portico-{n}" for n in range(19))
    floods = tuple(f"flood-{n}" for n in range(19))
    orgs = dict.fromkeys(porticos, "miraflores") | dict.fromkeys(floods, "la-victoria")
    s = Service(
        InFlight(256, gain=2.0, floor=2, clock=lambda: clock[0]),
        clock,
        600.0,
        0.003,
        callers=floods + porticos,
        demand=2,
        orgs=orgs,
    )
    s.serve(2.0)
    settled = len(s.times)
    counts = []
    for _ in range(100):
        s.serve(0.05)
        counts.append(s.f.count)
        assert s.f.held_by_org("la-victoria") <= s.f.org_share()
    times = sorted(s.times[settled:])
    assert (s.f.orgs, s.f.active, s.f.limit) == (2, 38, 4)
    assert max(counts) <= 4  # not 19 x 2 for each organisation: 76
    assert times[len(times) // 2] <= 3 * 0.003
    by_org = collections.Counter({o: 0 for o in ("miraflores", "la-victoria")})
    for caller, n in s.done.items():
        by_org[orgs[caller]] += n
    assert by_org["miraflores"] == pytest.approx(by_org["la-victoria"], rel=0.05)


def test_a_freed_unit_goes_to_a_waiter_of_an_organisation_under_its_share() -> None:
    """Waiters of an organisation at its share let their turn pass: a portico's probe
    waits only for its own organisation's units, however many of the flood's wait."""

    async def scenario() -> None:
        f = InFlight(256, gain=2.0, floor=1, clock=lambda: 0.0)
        f.enter("portico", org="miraflores")
        for k in range(4):
            f.enter(f"flood-{k}", org="la-victoria")
        f.probing, f.limit = False, 2
        assert (f.share(), f.org_share()) == (1, 1)
        order: list[str] = []

        async def probe(caller: str, org: str) -> None:
            await f.acquire(caller, org=org, stream=True)
            order.append(caller)

        tasks = [asyncio.create_task(probe(f"flood-{k}", "la-victoria")) for k in range(4)]
        tasks += [asyncio.create_task(probe("portico", "miraflores")) for _ in range(2)]
        await asyncio.sleep(0)
        assert order == ["flood-0", "portico"]  # one unit each organisation
        assert f.waiting == 4
        f.leave(stream=True, caller="flood-0")  # the flood's unit goes to its next waiter
        await asyncio.sleep(0)
        assert order[2:] == ["flood-1"]
        f.leave(stream=True, caller="portico")  # the portico's, past three flood waiters
        await asyncio.sleep(0)
        assert order[3:] == ["portico"]
        for k in (1, 2, 3):
            f.leave(stream=True, caller=f"flood-{k}")
            await asyncio.sleep(0)
        f.leave(stream=True, caller="portico")
        await asyncio.gather(*tasks)
        assert order[4:] == ["flood-2", "flood-3"]
        assert (f.streams, f.waiting, f.most_held_by_org) == (0, 0, 0)

    _run(scenario)


def test_a_caller_whose_probes_wait_or_are_in_flight_stays_active() -> None:
    """A flood's stream is not read while its probe waits, so it asks for nothing new; it
    must still count, else its organisation drops out and its waiting probes are handed
    units at the shares of fewer callers."""

    async def scenario() -> None:
        clock = [0.0]
        f = InFlight(256, gain=2.0, floor=1, clock=lambda: clock[0])
        f.enter("portico", org="miraflores")
        f.enter("flood", org="la-victoria")
        f.probing, f.limit = False, 2
        await f.acquire("flood", org="la-victoria", stream=True)
        waiter = asyncio.create_task(f.acquire("flood", org="la-victoria", stream=True))
        await asyncio.sleep(0)
        assert f.waiting == 1
        clock[0] += 5 * f.ACTIVE_S
        f.enter("portico", org="miraflores")  # prunes the callers not seen since
        assert (f.active, f.orgs, f.org_share()) == (2, 2, 1)
        f.leave(stream=True, caller="flood")
        await waiter
        clock[0] += 5 * f.ACTIVE_S
        f.enter("portico", org="miraflores")
        assert (f.active, f.orgs) == (2, 2)  # its probe is in flight
        f.leave(stream=True, caller="flood")
        clock[0] += 5 * f.ACTIVE_S
        f.enter("portico", org="miraflores")
        assert (f.active, f.orgs, f.org_share()) == (1, 1, 256)  # gone now

    _run(scenario)


def test_a_window_needs_its_minimum_duration() -> None:
    clock = [1000.0]
    f = InFlight(256, gain=2.0, clock=lambda: clock[0])
    f.enter("muni")
    for _ in range(4 * f.WINDOW_UNITS):  # many completions, all in the same instant
        f.enter("flood")
        f.leave(0.003)
    assert (f.limit, f.probing, f.unloaded_s) == (f.floor, True, None)
    clock[0] += f.WINDOW_S
    f.enter("flood")
    f.leave(0.003)
    assert not f.probing
    assert f.unloaded_s == pytest.approx(0.003)


def test_bulk_work_takes_units_of_the_ceiling_only_and_never_waits() -> None:
    """Imports and exports last minutes: at a limit of a few units they would lock matches
    out. They hold units of the ceiling, beside the limit, and are refused past it."""

    async def scenario() -> None:
        f = InFlight(6, floor=2, max_wait_s=60.0, clock=lambda: 0.0)
        f.limit = 4
        await f.acquire("muni")  # a second caller: the portico's share of the limit is 2
        f.leave()
        for _ in range(3):
            await f.acquire("admin", bulk=True)  # past the limit of 2: bulk does not count
        await f.acquire("portico", stream=True)
        await f.acquire("portico", stream=True)
        waiter = asyncio.create_task(f.acquire("portico", stream=True))  # the limit: waits
        await asyncio.sleep(0)
        assert (f.count, f.bulk, f.waiting) == (2, 3, 1)
        await f.acquire("admin", bulk=True)  # the sixth unit of the ceiling
        with pytest.raises(ResourceExhausted, match="ceiling of 6"):
            await f.acquire("admin", bulk=True)  # refused at once, not queued
        assert f.waiting == 1
        f.leave(bulk=True)  # a bulk unit frees, but the limit holds the probe
        await asyncio.sleep(0)
        assert (f.count, f.bulk, f.waiting) == (2, 3, 1)
        f.leave(stream=True, caller="portico")  # a probe's unit frees: the waiting probe takes it
        await waiter
        assert (f.count, f.bulk, f.waiting) == (2, 3, 0)
        # The ceiling holds everything else too: under the limit, but bulk fills the ceiling.
        f.leave(stream=True, caller="portico")
        await f.acquire("admin", bulk=True)
        await f.acquire("admin", bulk=True)
        waiter = asyncio.create_task(f.acquire("portico", stream=True))
        await asyncio.sleep(0)
        assert (f.count, f.bulk, f.waiting) == (1, 5, 1)
        f.leave(bulk=True)
        await waiter
        assert (f.count, f.bulk, f.waiting) == (2, 4, 0)

    asyncio.run(scenario())


def test_the_adaptive_limit_holds_stream_probes_and_calls_pass_them_to_the_ceiling() -> None:
    """A unary call has waited in gRPC core's arrival-order queue before it reaches the
    admission; holding it again below the ceiling only cost throughput under a unary flood
    (docs/performance.md, session 16). A stream's probe skipped that queue: the adaptive
    limit is where a flood over streams waits, and a call passes the probes that wait."""

    async def scenario() -> None:
        f = InFlight(4, floor=1, max_wait_s=60.0, clock=lambda: 0.0)
        f.limit = 2
        await f.acquire("muni")  # a second caller: the flood's share of the limit is 1
        f.leave()
        await f.acquire("flood", stream=True)
        probes = [asyncio.create_task(f.acquire("flood", stream=True)) for _ in range(3)]
        await asyncio.sleep(0)
        assert (f.streams, f.waiting) == (1, 3)
        await f.acquire("muni")  # a call: past the waiting probes, under the ceiling
        await f.acquire("muni")
        assert (f.count, f.streams) == (3, 1)
        await f.acquire("muni")  # the ceiling of 4
        calls = [asyncio.create_task(f.acquire("muni")) for _ in range(2)]
        await asyncio.sleep(0)
        assert f.waiting == 5
        # A call's unit frees: the flood's turn comes first, but its probe cannot take a call's
        # unit past its share of the limit, so the turn passes to the call that waits.
        f.leave()
        await asyncio.sleep(0)
        assert [t.done() for t in calls] == [True, False]
        assert (f.count, f.streams, f.waiting) == (4, 1, 4)
        f.leave(stream=True, caller="flood")  # a probe's unit frees: the next probe takes it
        await asyncio.sleep(0)
        assert sum(t.done() for t in probes) == 1
        assert (f.count, f.streams) == (4, 1)
        for task in (*probes, *calls):
            task.cancel()
        await asyncio.gather(*probes, *calls, return_exceptions=True)

    asyncio.run(scenario())


def test_a_floor_above_the_ceiling_is_the_ceiling() -> None:
    f = InFlight(4, gain=2.0, floor=32)
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
        f.leave(stream=True)
        f.leave(stream=True)
        assert (f.count, f.streams) == (0, 0)
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
        f.leave()  # the call's unit goes to the first probe, each probe's to the next
        for n, task in enumerate(probes):
            await task
            if n < len(probes) - 1:
                f.leave(stream=True, caller="a")
        assert (f.count, f.streams, f.waiting) == (1, 1, 0)

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
        {"admission_gain": 0.5},
        {"admission_gain": -1.0},
        {"admission_floor": 0},
    ):
        with pytest.raises(ConfigError):
            server_options(Settings(data_dir=tmp_path, **bad))


def test_a_call_whose_deadline_leaves_less_than_the_service_takes_is_not_started() -> None:
    """A unit given to a call that will answer after its caller has gone is a unit lost to
    one that could still use it: at arrival and at its turn, a call whose deadline leaves
    less than the last window's mean time in the service is refused, and its turn passes on.
    """

    async def scenario() -> None:
        clock = [1000.0]
        f = InFlight(1, floor=1, max_wait_s=60.0, clock=lambda: clock[0])
        for _ in range(f.WINDOW_UNITS):  # one window whose units took 20 ms each
            f.enter()
            clock[0] += 0.01
            f.leave(0.020)
        assert f.expected_s == pytest.approx(0.020)
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await f.acquire("flood", deadline=clock[0] + 0.010)  # free unit, too little time
        assert f.count == 0
        await f.acquire("flood", deadline=clock[0] + 0.030)
        late = asyncio.create_task(f.acquire("flood", deadline=clock[0] + 0.050))
        other = asyncio.create_task(f.acquire("portico", deadline=clock[0] + 1.0))
        await asyncio.sleep(0)
        assert f.waiting == 2
        clock[0] += 0.040  # the first call's answer; 10 ms are left to the waiting one
        f.leave(0.040)
        with pytest.raises(DeadlineExceeded):
            await late
        await other  # the unit went on to the next in turn
        assert (f.count, f.waiting) == (1, 0)
        # Without a deadline (a stream's probe), nothing is refused for time.
        f.leave(0.02)
        await f.acquire("portico", stream=True)
        assert f.count == 1
        f.leave(0.02, stream=True, caller="portico")
        # One slow window (a database stall) is not held against every later call: refused
        # calls complete no window, so the expectation lapses after EXPECTED_S.
        for _ in range(f.WINDOW_UNITS - 2):
            f.enter()
            clock[0] += 0.1
            f.leave(3.0)
        assert f.expected_s > 1.0
        with pytest.raises(DeadlineExceeded):
            await f.acquire("flood", deadline=clock[0] + 1.0)
        clock[0] += f.EXPECTED_S + 0.01
        await f.acquire("flood", deadline=clock[0] + 1.0)
        assert f.count == 1

    asyncio.run(scenario())


def _call_once(f: InFlight, callers: list[tuple[str, str]]) -> None:
    """A unary call from each (caller, organisation): all of them active."""
    for caller, org in callers:
        f.enter(caller, org=org)
        f.leave()


class _Looking(InFlight):
    """Counts how many times a hand-over asks whether a caller's next unit is free."""

    looked = 0

    def _free(self, stream: bool, caller: str = "") -> bool:
        self.looked += 1
        return super()._free(stream, caller)


def test_a_hand_over_looks_at_the_callers_it_can_serve_not_at_every_caller_that_waits() -> None:
    """A national programme has thousands of cameras, each its own certificate. When the
    shares hold most of them back, a freed unit must not cost a look at each: passing turns
    round a line of 1,000 waiting callers cost 1.1 ms a completion, half a decision's own
    CPU (benchmarks/admission.py). Callers held back by their share are parked until it
    has room, so a completion looks at the few that can take a unit."""

    async def scenario() -> None:
        f = _Looking(1024, gain=2.0, floor=1, max_wait_s=60.0, clock=lambda: 0.0)
        cameras = [(f"cam-{k:03d}", f"muni-{k % 20:02d}") for k in range(300)]
        _call_once(f, cameras)
        f.probing, f.limit = False, 2  # one probe each, and each organisation's part: 1
        assert (f.share(), f.org_share()) == (1, 1)
        waiters = []
        for caller, org in cameras:  # two streams each: one probe in flight or waiting
            for _ in range(2):
                waiters.append(asyncio.create_task(f.acquire(caller, org=org, stream=True)))
        await asyncio.sleep(0)
        assert (f.streams, f.waiting) == (20, 580)  # one per organisation in flight
        f.leave()  # a first hand-over parks them all
        for _ in range(50):
            f.looked = 0
            caller = next(c for c, _ in cameras if f.held_by(c))
            f.leave(stream=True, caller=caller)
            assert f.streams == 20  # the unit went to a waiter of the same organisation ...
            assert f.looked <= 4  # ... found without looking at 580 waiting probes
            await asyncio.sleep(0)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert f.waiting == 0

    _run(scenario)


def test_after_every_hand_over_no_waiting_unit_could_have_been_taken() -> None:
    """The parking must lose no wake-up. A seeded random run of probes and calls from six
    callers of three organisations arriving, completing and going away, while the limit
    moves and remeasuring windows come and go: after every completion's hand-over, either
    the ceiling is reached or no caller's next waiting unit is one it could take."""
    rng = random.Random(20261207)

    async def scenario() -> None:
        f = InFlight(8, gain=2.0, floor=2, max_wait_s=60.0, clock=lambda: 0.0)
        callers = [(f"c{k}", f"o{k % 3}") for k in range(6)]
        _call_once(f, callers)
        f.probing = False
        held: list[tuple[str, bool]] = []
        tasks: list[tuple[asyncio.Task[None], str, bool]] = []

        async def unit(caller: str, org: str, stream: bool) -> None:
            await f.acquire(caller, org=org, stream=stream)
            held.append((caller, stream))

        checked = 0
        for _ in range(4000):
            action = rng.random()
            if action < 0.45:
                caller, org = rng.choice(callers)
                stream = rng.random() < 0.8
                tasks.append((asyncio.create_task(unit(caller, org, stream)), caller, stream))
            elif action < 0.55:
                waiting = [t for t, _c, _s in tasks if not t.done()]
                if waiting:
                    rng.choice(waiting).cancel()
            elif action < 0.65:
                f.limit = rng.randint(1, 8)
                f.probing = rng.random() < 0.2
            await asyncio.sleep(0)  # arrivals queue or take, cancellations are discarded
            tasks = [(t, c, s) for t, c, s in tasks if not t.done()]
            if action >= 0.65 and held:
                caller, stream = held.pop(rng.randrange(len(held)))
                f.leave(stream=stream, caller=caller)
                checked += 1
                could = [
                    c
                    for c in f._queues
                    if not f._queues[c][0].future.done() and f._free(f._queues[c][0].stream, c)
                ]
                assert f._at_ceiling() or not could, (checked, could)
        assert checked > 1000
        assert f.waiting > 0  # the shares held some back to the end
        for task, _c, _s in tasks:
            task.cancel()
        await asyncio.gather(*(t for t, _c, _s in tasks), return_exceptions=True)
        assert f.waiting == 0

    _run(scenario)


def test_a_caller_its_own_share_now_holds_back_passes_its_organisations_unit_on() -> None:
    """A unit of an organisation's part goes to the first of its callers parked for it; if
    that one's own share has shrunk meanwhile (more callers became active), the unit goes
    on to the next of the organisation, not unused until another completes."""

    async def scenario() -> None:
        f = InFlight(256, gain=2.0, floor=1, clock=lambda: 0.0)
        for caller, org in (("a", "x"), ("b", "x"), ("e", "x"), ("c", "y")):
            f.enter(caller, org=org)
        f.probing, f.limit = False, 12
        assert (f.share(), f.org_share()) == (3, 6)
        for caller, n in (("a", 3), ("b", 2), ("e", 1)):
            for _ in range(n):
                f.enter(caller, org="x", stream=True)
        b = asyncio.create_task(f.acquire("b", org="x", stream=True))
        e = asyncio.create_task(f.acquire("e", org="x", stream=True))
        await asyncio.sleep(0)
        f.enter("c", org="y")
        f.leave()  # a hand-over: b and e wait for their organisation's part, in that order
        f.enter("g", org="y")
        f.enter("h", org="y")  # six callers now: each one's share is 2, b is at it
        assert (f.share(), f.org_share()) == (2, 6)
        f.leave(stream=True, caller="a")
        await asyncio.sleep(0)
        assert (b.done(), e.done()) == (False, True)
        assert (f.held_by_org("x"), f.held_by("e")) == (6, 2)
        b.cancel()
        await asyncio.gather(b, return_exceptions=True)
        assert f.waiting == 0

    _run(scenario)


def test_a_second_organisation_has_a_value_measured_within_one_measured_again() -> None:
    """A flood's four certificates alone (one organisation) remeasure at one probe each, so
    their window measures four probes' shared time (5.8-6.8 ms where the service takes 2.5),
    and that limit held the first seconds of the next phase, with 19 porticos of another
    organisation beside it (fairness.py, session 20). When a second organisation arrives,
    the unloaded time is measured again at once; a value measured with two organisations
    active is kept until it is due."""
    clock = [1000.0]
    f = InFlight(256, gain=2.0, floor=2, clock=lambda: clock[0])
    flood = [f"flood-{k}" for k in range(4)]

    def window(callers: list[tuple[str, str]], elapsed_s: float) -> None:
        """Completions, each caller's probe at a time, until a measurement is taken."""
        while True:
            clock[0] += 0.002
            for caller, org in callers:
                f.enter(caller, org=org, stream=True)
            for caller, _org in callers:
                f.leave(elapsed_s, stream=True, caller=caller)
            if not f.probing:
                return

    _call_once(f, [(c, "la-victoria") for c in flood])
    assert f.probing  # a second caller, nothing measured yet
    window([(c, "la-victoria") for c in flood], 0.0065)
    assert f.unloaded_s == pytest.approx(0.0065)
    was = f.limit
    with structlog.testing.capture_logs() as logs:
        f.enter("portico-01", org="miraflores")  # a second organisation: measured again
    assert (f.probing, f.limit) == (True, f.floor)
    # ... and the drop to the floor is in the log, with why (session 20's traces had a gap)
    drops = [e for e in logs if e["event"] == "admission.limit"]
    assert [(e["why"], e["was"], e["limit"]) for e in drops] == [
        ("second organisation", was, f.floor)
    ]
    window([(flood[0], "la-victoria"), ("portico-01", "miraflores")], 0.0025)
    assert f.unloaded_s == pytest.approx(0.0025)
    clock[0] += 3 * f.ACTIVE_S  # the porticos go quiet and are forgotten ...
    f.enter(flood[0], org="la-victoria")
    assert f.orgs == 1
    f.enter("portico-01", org="miraflores")  # ... and come back, within PROBE_S
    assert (f.orgs, f.probing) == (2, False)
