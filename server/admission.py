"""Admission under overload: bound the queue in front of the service, not only the work in it.

Three bounds shed what the server cannot serve in time:

* **Streams per connection** (``max_streams_per_connection``, HTTP/2
  SETTINGS_MAX_CONCURRENT_STREAMS, here): a client connection may have that many calls open
  at once; its own transport holds the rest until a stream ends, or until their deadline.
  A client that floods therefore queues in its own process and costs the server nothing
  beyond its share, where every call it sends past the bounds below still costs the server
  a TLS record, an HTTP/2 stream and a refusal: at 10x the capacity of one core that work
  left 39 % of the capacity for answers (``benchmarks/load.py --pin``). A stream the client
  opens in the instant another ends or is cancelled, before the server has counted that one
  closed (or before the client has seen the limit), is reset unstarted with REFUSED_STREAM,
  in C: the client sees UNAVAILABLE, nothing was decided, and ``centinela.clients`` sends it
  again. A StreamMatch is one stream whatever it carries.

* **In flight** (``max_concurrent_rpcs``, :class:`InFlight`, kept by
  :class:`~centinela.server.interceptors.CentinelaInterceptor`): work past the limit waits
  in a queue per caller (client certificate), and freed units go round robin to the callers
  that wait, so one client's flood costs every other client one turn, not the flood's
  length. A call waits at most ``admission_max_wait_ms`` and a caller may have
  ``admission_queue_per_caller`` waiting; past either it gets RESOURCE_EXHAUSTED. A unit is
  a call, or one probe of a StreamMatch (an open, idle stream holds none); with
  ``admission_gain`` set, a client's probes are also held at its share of an adaptive
  limit below the ceiling, which follows the service's own unloaded time, whenever another
  client needs the service too, and its organisation's certificates together at their
  organisation's share whenever another organisation does.
* **Waiting** (``max_pending_rpcs``, here): calls the transport accepted but the server's
  event loop has not picked up yet. When the loop is saturated (10x the capacity on a small
  machine), this queue, not the work in flight, decides the latency: gRPC's own defaults let
  1,000 to 3,000 calls wait there, seconds of queueing that every admitted call pays and that
  outlives most callers' deadlines (the server then works for callers that are gone). Bounded
  here, gRPC core refuses the excess itself, in C, without a cycle of the Python loop;
  clients see those refusals as CANCELLED (gRPC's status for a call the server dropped
  before starting it), and as DEADLINE_EXCEEDED what waited too long.

The waiting bound is gRPC core's pending-request protection: up to half of
``max_pending_rpcs`` every call may wait, between half and all of it calls are refused with a
rising probability (random early detection), beyond it every new call is refused. That
queue does not know who sent what: once one client's open streams (the stream bound times
its connections) reach half of ``max_pending_rpcs``, its calls push the others' out before
the fair queue of :class:`InFlight` sees them (docs/performance.md: the rule was measured
with bounds 8, 16 and 32).

Below that rule calls are not lost, but they are not served fairly either: grpcio's asyncio
server keeps one request outstanding per registered method with gRPC core and asks for the
next one only after the event loop has taken the last, so under a flood the loop takes calls
in at the pace it serves them and the backlog stays in gRPC core's queue, in arrival order.
A well-behaved client's call waits there behind every stream the flood holds open (their
number over the answered rate, Little's law), and the per-caller queue of :class:`InFlight`
stays empty. The streams one client can hold open (``max_streams_per_connection`` times its
connections) therefore set what the others wait (``benchmarks/load.py`` splits a probe
client's latency into the wait before the service and the time in it). ``intake_lanes``
binds the port to several such servers (:class:`~centinela.server.app.CentinelaServer`), each
taking its own connections' calls in: a flood then holds up only the connections the kernel
put on its lanes. None of this queue holds a StreamMatch probe: it is a message on a call
already taken in, read by that call's own coroutine, so a portico's probes reach
:class:`InFlight` (and its fairness) however many calls wait in gRPC core. A flood sent as
StreamMatch messages reaches it too; then the in-flight limit decides what the others wait,
because the units in flight share the loop (docs/performance.md, session 15). That is why
probes, and only probes, are held at an adaptive limit that follows the service's own
unloaded time, each active client at its equal share of it, and a client alone at the
ceiling only (:class:`InFlight`; held in total, the limit cost a lone client's StreamMatch
throughput: sessions 16 and 17).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import NamedTuple

from centinela.config import Settings
from centinela.errors import ConfigError, DeadlineExceeded, ResourceExhausted
from centinela.logs import get_logger

log = get_logger("server.admission")

#: gRPC core channel arguments (``src/core/server/server.h``).
MAX_PENDING = "grpc.server.max_pending_requests"
MAX_PENDING_HARD = "grpc.server.max_pending_requests_hard_limit"
#: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS the server announces on every connection.
MAX_STREAMS = "grpc.max_concurrent_streams"


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server options that bound the waiting queue.

    Raises:
        ConfigError: a limit is not positive.
    """
    if settings.max_concurrent_rpcs < 1:
        raise ConfigError("max_concurrent_rpcs must be at least 1")
    if settings.max_pending_rpcs < 2:
        raise ConfigError("max_pending_rpcs must be at least 2")
    if not (settings.admission_gain == 0.0 or 1.0 <= settings.admission_gain <= 100.0):
        raise ConfigError(
            "admission_gain must be 0 (a fixed limit) or between 1 and 100: below 1 the "
            "limit could not keep the rate it measures"
        )
    if not 0.0 <= settings.admission_max_wait_ms < 3_600_000:
        raise ConfigError(
            "admission_max_wait_ms must be 0 (refuse at once) or a positive number of ms"
        )
    if settings.admission_floor < 1:
        raise ConfigError("admission_floor must be at least 1")
    if settings.admission_queue_per_caller < 1:
        raise ConfigError("admission_queue_per_caller must be at least 1")
    if settings.max_streams_per_connection < 0:
        raise ConfigError("max_streams_per_connection must be 0 (no limit) or positive")
    options = [
        (MAX_PENDING, settings.max_pending_rpcs // 2),
        (MAX_PENDING_HARD, settings.max_pending_rpcs),
    ]
    if settings.max_streams_per_connection:
        options.append((MAX_STREAMS, settings.max_streams_per_connection))
    return options


class _Waiter(NamedTuple):
    future: asyncio.Future[None]
    deadline: float | None
    stream: bool


def _drop_one(counts: dict[str, int], key: str) -> None:
    """One fewer for ``key``; no entry at none."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


_TOO_LATE = (
    "the call's deadline leaves less time than the service takes now; not started "
    "(send it again with a longer deadline, or later)"
)

#: The adaptive limit never goes below this many units (the default ``admission_floor``).
MIN_LIMIT = 2


class InFlight:
    """Work admitted and not yet answered, against a ceiling and, for stream probes, an
    adaptive limit, with the work past them waiting in a queue **per caller**, served in turn.

    Three kinds of unit, all counted against ``ceiling`` (``max_concurrent_rpcs``):

    * **a unary call.** It has already waited in gRPC core's arrival-order queue, taken in
      at the pace the loop serves (module doc), so it is held only at the ceiling. Holding
      it again at the adaptive limit under a unary flood cost 20-30 % of the answers and
      shortened a well-behaved client's p50 by a sixth (docs/performance.md, session 16).
    * **one message of a StreamMatch** (a stream probe). A portico's stream stays open all
      day and is idle between captures, so it holds a unit only while one of its probes is
      being decided (a thousand open streams must not lock unary callers out). Probes skip
      gRPC core's queue, so a flood sent over streams meets its first bound here: with a
      ``gain``, each caller's probes are also held at its **share** of the adaptive
      ``limit`` (below), and wait there, fairly.
    * **bulk** work (a client-streamed import, a server-streamed export): it lasts seconds to
      minutes, holds a unit of the ceiling only, and never waits: past the ceiling it is
      refused at once.

    **Past the limit, work waits, fairly** (:meth:`acquire`). Each caller (a client
    certificate) has its own queue; when a unit frees it goes to the caller whose turn it is,
    round robin over the callers that wait, first come first served within one caller's
    queue. So a client that floods gets, while it floods, one unit in turn with every other
    client that waits, whatever its share of the arrivals: a portico with two calls waiting
    beside a flood with a hundred waits for one hand-over, not for the hundred. This is
    fair queueing (Demers, Keshav and Shenker; deficit round robin with equal costs) over
    callers, the partitioned limiter of Netflix's concurrency-limits without fixed shares.
    A waiting call is held on its own stream: it costs the server a coroutine and its
    request, not the CPU of a refusal and a resend, and with ``max_streams_per_connection``
    a flooding connection's further calls then wait in its own transport.

    A call waits at most ``max_wait_s`` (then RESOURCE_EXHAUSTED, and its deadline may end it
    first), and one caller may have at most ``queue_per_caller`` calls waiting (beyond, they
    are refused at once): memory stays bounded whatever a client sends. ``max_wait_s`` 0
    refuses at the limit at once. A stream's probe waits without either bound (its stream is
    not read meanwhile: backpressure, as HTTP/2 flow control means it; one probe at a time
    per stream).

    **Shares: the limit binds only between callers.** A caller (client certificate) that
    asked for a call or a probe in the last ``ACTIVE_S`` (to twice that: the list is pruned
    once per ``ACTIVE_S``), or has one waiting or in flight, is *active*; health checks and
    reflection (no certificate) and bulk work do not count. A lone active caller's probes
    are held at the ceiling only: there is nobody to protect, and holding its probes at a
    few units only made fewer of them share each audit commit (StreamMatch throughput at
    8-32 outstanding fell by 20-40 % in session 16, when the limit held all probes
    together). With ``n`` active callers each may have ``limit // n`` probes in flight, and
    never fewer than ``floor`` (a portico's two streams each keep a probe in flight), but
    for the one window in ``PROBE_S`` that remeasures the unloaded time, when each has
    ``floor // n`` (at least one). The flood's share shrinks to make room for the others,
    and a portico that has fewer probes outstanding than its share is not held at all.
    Unary calls are never held at the limit, but their callers count, so a flood over
    streams cannot take the loop from a unary client.

    **Organisations share as one.** A certificate is cheap for the organisation it belongs
    to (subject ``O``: a municipality, the PNP), so a client that spreads a flood over more
    of its certificates would take a floor of the limit with each: 19 took 38 probes beside
    19 porticos' 38, and the porticos waited 24 times their time alone (docs/performance.md,
    session 18). So while two or more organisations are active, each one's callers together
    may have ``limit // orgs`` probes in flight (at least ``floor``; while the unloaded time
    is remeasured ``floor // orgs``, at least one), each caller still within its own share;
    a unit freed by one organisation goes to a waiter of an organisation under its part. The
    limit then binds at the number of organisations, not of certificates: a flood is held
    at its organisation's part whatever it is spread over, and the remeasuring window runs
    at ``floor // orgs`` probes per busy organisation, at least one (the floor in total up
    to ``floor`` organisations; with more, one each). An organisation alone is not held as one: its
    certificates share the limit as above (19 porticos alone each keep their floor). What
    this cannot hold is a flood spread over organisations: one certificate per system, and
    an organisation per data owner or municipality, is the CA's to keep
    (deploy/README.md).

    **Adaptive limit (stream probes): the work the service completes in its own unloaded
    time, times a gain.** Units in flight share one event loop, so each one's time in the
    service grows with their number; past the number that keeps the loop busy, more units
    only lengthen everyone's time, and a well-behaved client's call waits behind the units a
    stream flood holds. The limit is therefore set as TCP BBR sets its window (Cardwell et
    al., 2016): the bandwidth-delay product, here the highest completion rate seen lately
    times the lowest mean time in the service, times ``gain`` (Little's law: ``rate x time``
    units keep the service at that rate; the gain is headroom for the audit commit's waits).
    Both are measured over all measured units (calls and probes), per window of at least
    ``WINDOW_UNITS`` completions and ``WINDOW_S`` seconds:

    * the **rate** is the window's completions over its length, the highest of the windows
      of the last ``RATE_S`` seconds;
    * the **unloaded time** is measured at the floor. A mean measured with many units in
      flight includes their sharing, and a limit computed from it only confirms itself. So
      ``PROBE_S`` seconds after the last measurement (or when none has been made yet) the
      limit drops to ``floor`` for one window, once every caller's probes in flight have
      drained to its share of it, and that window's mean becomes the new value (BBR's
      ProbeRTT). Under a steady flood this costs one window in ``PROBE_S``. It happens only
      while two or more callers are active (a lone caller's windows measure its own load),
      and at once when a second caller arrives with no fresh value, or a second
      organisation where the value was measured among one organisation's callers (their
      shared time, at one probe each, when they outnumber the floor). A loaded window whose
      mean comes in under the value lowers it, but does not put the next measurement off:
      a measurement that came out high (streams opening as it ran) sets a limit at which the
      flood's part keeps the loaded windows just under it, and when those counted as fresh
      measurements the limit stood there for a whole 20 s phase (session 19). For the same
      reason a measurement more than ``RISE`` times the value is not taken until another,
      ``CONFIRM_S`` later, agrees with it (:meth:`_measured`): a slower service is
      followed a second or two late, a noisy window not at all.

    The limit moves at most to twice its value per window (a start from the floor doubles
    while the time stays low) and stays between ``floor`` and ``ceiling``. On one core with a
    local database it settles near ``gain`` times the work the floor keeps in flight: one
    decision's unloaded time is a few milliseconds of CPU. Where the audit commits to a
    distant database, the unloaded time is longer and the limit larger by as much, without a
    setting to change. ``gain`` 0 keeps the ceiling fixed.

    **Deadlines.** Each window's mean is also what a call admitted now can expect
    (``expected_s``, for ``EXPECTED_S`` after the window): a call whose deadline leaves less
    is refused with DEADLINE_EXCEEDED, when it arrives or when its turn comes, rather than
    worked for a caller that will have gone. Everything runs on the server's event loop: no lock.
    """

    WINDOW_UNITS = 32
    WINDOW_S = 0.25
    RATE_S = 5.0
    PROBE_S = 10.0
    #: How soon a measurement of the unloaded time above ``RISE`` times the value is
    #: measured again.
    CONFIRM_S = 1.0
    RISE = 1.1
    #: How many times in a row a rise is measured again before the lower of the last two
    #: measurements is taken, however far apart they are.
    CONFIRMS = 4
    #: How long a window's mean counts as what a call admitted now can expect.
    EXPECTED_S = 1.0
    #: How long a caller counts as active (sharing the limit) after it last asked for a unit.
    ACTIVE_S = 1.0

    def __init__(
        self,
        ceiling: int,
        *,
        gain: float = 0.0,
        floor: int = MIN_LIMIT,
        max_wait_s: float = 0.0,
        queue_per_caller: int = 128,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.ceiling = ceiling
        self.limit = ceiling
        self.floor = min(floor, ceiling)
        self.gain = gain
        self.max_wait_s = max_wait_s
        self.queue_per_caller = queue_per_caller
        #: Units held: calls and probes (``count``; the probes also per caller in ``_held``,
        #: against each caller's share of ``limit``) and bulk work, all against ``ceiling``.
        self.count = 0
        self.bulk = 0
        self._waiting = 0
        self._waiting_calls = 0
        #: Each waiting caller's queue; the waiting callers whose turn may come, in turn
        #: order (each once); and the ones whose next unit is a stream probe that a share
        #: holds back, parked until that share has room (:meth:`_park`). Every waiting caller
        #: is in exactly one of ``_turns``, ``_parked_own`` and ``_parked_org[its org]``.
        self._queues: dict[str, collections.deque[_Waiter]] = {}
        self._turns: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._parked_own: dict[str, None] = {}
        self._parked_org: dict[str, collections.OrderedDict[str, None]] = {}
        #: ``share()`` and ``org_share()`` when a caller was last parked or a hand-over last
        #: found callers parked: when either grows, every parked caller is looked at again.
        self._shares = (0, 0)
        #: The estimates: the unloaded time (and when it was last measured at the floor),
        #: recent window rates.
        self.unloaded_s: float | None = None
        #: The last window's mean time in the service: what a call admitted now can expect.
        self.expected_s = 0.0
        self._expected_at = 0.0
        #: When the unloaded time is to be measured again (at the floor).
        self._measure_at = 0.0
        #: A measurement above ``RISE`` times the value, not yet confirmed (with when it was
        #: made), and how many such measurements in a row have been made.
        self._rise: tuple[float, float] | None = None
        self._confirms = 0
        #: The organisations active when the unloaded time was last measured at the floor.
        self._measured_orgs = 0
        self._rates: collections.deque[tuple[float, float]] = collections.deque()
        #: A probe: ``limit`` is the floor; ``_probe_armed`` once the units have drained to it.
        self.probing = False
        self._probe_armed = False
        #: Stream probes in flight per caller, and when each caller last asked for a unit
        #: (with its organisation): the callers seen in the last ``ACTIVE_S`` share the limit.
        self._held: dict[str, int] = {}
        self._seen: dict[str, tuple[float, str]] = {}
        #: Stream probes in flight per organisation, and the active callers of each active
        #: organisation. A caller's organisation is the one ``_seen`` holds for it: a caller
        #: with probes in flight or waiting is never forgotten.
        self._org_held: dict[str, int] = {}
        self._org_callers: collections.Counter[str] = collections.Counter()
        self._pruned_at = clock()
        self._reset(clock())

    @classmethod
    def from_settings(cls, settings: Settings) -> InFlight:
        """The limit, adaptation and queues a server's settings give."""
        return cls(
            settings.max_concurrent_rpcs,
            gain=settings.admission_gain,
            floor=settings.admission_floor,
            max_wait_s=settings.admission_max_wait_ms / 1000.0,
            queue_per_caller=settings.admission_queue_per_caller,
        )

    @property
    def rate(self) -> float:
        """The highest completion rate (units/s) of the recent windows; 0 before any."""
        return max((r for _t, r in self._rates), default=0.0)

    @property
    def waiting(self) -> int:
        """Calls and stream probes waiting for a unit."""
        return self._waiting

    def waiting_for(self, caller: str) -> int:
        """What one caller has waiting."""
        queue = self._queues.get(caller)
        return len(queue) if queue else 0

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._units = 0
        self._total_s = 0.0

    def _at_ceiling(self) -> bool:
        return self.count + self.bulk >= self.ceiling

    @property
    def active(self) -> int:
        """Callers (client certificates) that asked for a unit in the last ``ACTIVE_S``, or
        have one waiting or in flight."""
        return len(self._seen)

    def share(self) -> int:
        """Stream probes one caller may have in flight: the ceiling while it is the only
        active caller (or the limit is the ceiling), else its equal part of the limit, at
        least the floor; while the unloaded time is remeasured, its equal part of the floor
        (at least one), so that the probe window runs near the floor in total, up to
        ``floor`` callers: with more, it runs at one probe each and measures their shared
        time, and the limit follows (docs/performance.md, session 18), unless two or more
        organisations are active: then :meth:`org_share` holds each organisation at its
        part of the floor (at least one)."""
        return self._part(len(self._seen))

    def _part(self, sharers: int) -> int:
        """One of ``sharers``' equal part of the limit (see :meth:`share`)."""
        if sharers <= 1 or self.limit >= self.ceiling:
            return self.ceiling
        if self.probing:
            return max(1, self.floor // sharers)
        return max(self.floor, self.limit // sharers)

    @property
    def orgs(self) -> int:
        """Organisations with an active caller."""
        return len(self._org_callers)

    def org_share(self) -> int:
        """Stream probes one organisation's callers may have in flight together: the
        ceiling while it is the only active organisation (or the limit is the ceiling), else
        its equal part of the limit, at least the floor; while the unloaded time is
        remeasured, its equal part of the floor (at least one)."""
        return self._part(len(self._org_callers))

    def held_by(self, caller: str) -> int:
        """Stream probes ``caller`` has in flight."""
        return self._held.get(caller, 0)

    def held_by_org(self, org: str) -> int:
        """Stream probes the callers of ``org`` have in flight."""
        return self._org_held.get(org, 0)

    @property
    def streams(self) -> int:
        """Stream probes in flight, all callers together."""
        return sum(self._held.values())

    @property
    def most_held(self) -> int:
        """The most stream probes one caller has in flight."""
        return max(self._held.values(), default=0)

    @property
    def most_held_by_org(self) -> int:
        """The most stream probes one organisation has in flight."""
        return max(self._org_held.values(), default=0)

    def _org(self, caller: str) -> str:
        """``caller``'s organisation (itself for a caller never seen: no certificate)."""
        seen = self._seen.get(caller)
        return seen[1] if seen is not None else caller

    def _free(self, stream: bool, caller: str = "") -> bool:
        return not self._at_ceiling() and (
            not stream
            or (
                self.held_by(caller) < self.share()
                and self.held_by_org(self._org(caller)) < self.org_share()
            )
        )

    def _take(self, stream: bool, caller: str) -> None:
        self.count += 1
        if stream:
            org = self._org(caller)
            self._held[caller] = self.held_by(caller) + 1
            self._org_held[org] = self.held_by_org(org) + 1

    def _see(self, caller: str, org: str, now: float) -> None:
        """Note ``caller`` (of ``org``) as active; forget the callers not seen for
        ``ACTIVE_S`` that have nothing waiting or in flight. Calls without a client
        certificate (health checks, reflection) and bulk work (imports, exports: nobody waits
        on their latency) do not count.

        A caller whose probes wait stays active however long they wait: its stream is not
        read meanwhile, so it asks for nothing new. Forgotten, it would leave the shares to
        grow while its waiting probes are handed units at them: when the audit stalls for
        more than ``ACTIVE_S``, every caller waits, and the shares would be the ceiling just
        as the stall ends."""
        if now - self._pruned_at > self.ACTIVE_S:
            self._pruned_at = now
            for gone in [
                c
                for c, (t, _o) in self._seen.items()
                if now - t > self.ACTIVE_S and c not in self._queues and c not in self._held
            ]:
                self._forget(gone)
        if not caller:
            return
        seen = self._seen.get(caller)
        if seen is None:
            if len(self._seen) == 1 and self._stale(now):
                # A second caller: the limit starts to bind, so measure the unloaded time now
                # (a lone caller's windows measured it loaded, or not at all).
                self._start_probe("second caller")
            elif (
                self.gain
                and not self.probing
                and org not in self._org_callers
                and len(self._org_callers) == 1
                and self._measured_orgs < 2
            ):
                # A second organisation, where the value was measured among one
                # organisation's callers: with more of them than the floor, the window held
                # each at one probe and measured their shared time (a flood's four
                # certificates alone: 5.8-8.0 ms where the service takes 2.5), and that
                # limit held the next phase's first seconds (session 20). The limit now
                # binds between organisations: measure at once.
                self._start_probe("second organisation")
            self._org_callers[org] += 1
        else:
            org = seen[1]  # a certificate has one organisation
        self._seen[caller] = (now, org)

    def _forget(self, caller: str) -> None:
        _t, org = self._seen.pop(caller)
        self._org_callers[org] -= 1
        if self._org_callers[org] <= 0:
            del self._org_callers[org]

    def enter(
        self, caller: str = "", *, org: str | None = None, stream: bool = False, bulk: bool = False
    ) -> None:
        """Take a unit at once, or refuse: a call's (against the ceiling), a stream probe's
        (``stream``: against ``caller``'s share of the adaptive limit and its ``org``'s, by
        default an organisation of its own, too) or bulk work's (against the ceiling).

        Raises:
            ResourceExhausted: the limit is reached.
        """
        if not bulk:
            self._see(caller, caller if org is None else org, self._clock())
        self._enter(caller, stream=stream, bulk=bulk)

    def _enter(self, caller: str, *, stream: bool, bulk: bool) -> None:
        if bulk:
            if self._at_ceiling():
                raise ResourceExhausted(
                    f"server holds its ceiling of {self.ceiling} units of work; retry with backoff"
                )
            self.bulk += 1
            return
        if not self._free(stream, caller) or self._queued(stream, caller):
            raise ResourceExhausted("server is at its concurrency limit; retry with backoff")
        self._take(stream, caller)

    def _queued(self, stream: bool, caller: str) -> bool:
        """Whether a new unit must queue behind others: a call behind the calls that wait
        (at the ceiling), a probe behind its own caller's."""
        return caller in self._queues if stream else self._waiting_calls > 0

    def _too_late(self, deadline: float | None, now: float | None = None) -> bool:
        if deadline is None:
            return False
        if now is None:
            now = self._clock()
        # A stale expectation counts for nothing: refused calls complete no window, and one
        # slow window (a database stall) must not refuse every later call for good.
        fresh = now - self._expected_at <= self.EXPECTED_S
        return deadline - now < (self.expected_s if fresh else 0.0)

    async def acquire(
        self,
        caller: str = "",
        *,
        org: str | None = None,
        stream: bool = False,
        bulk: bool = False,
        deadline: float | None = None,
    ) -> None:
        """Take a unit, waiting in ``caller``'s queue at the limit (a stream probe's also at
        its ``org``'s share; by default the caller is an organisation of its own).

        A call (``stream`` false) waits at most ``max_wait_s`` and is refused when its
        caller already has ``queue_per_caller`` waiting; a stream's probe waits unbounded;
        ``bulk`` work never waits (:meth:`enter`). A call whose ``deadline`` (on this
        limiter's clock) leaves less than the last window's mean time in the service, when it
        arrives or when its turn comes, is refused instead of started: its answer would come
        too late, and the unit is worth more to a call that can still use it.

        Raises:
            ResourceExhausted: a call was refused or waited ``max_wait_s`` in vain.
            DeadlineExceeded: the call's deadline would end before its answer.
        """
        if not bulk:
            now = self._clock()
            self._see(caller, caller if org is None else org, now)
            if self._too_late(deadline, now):
                raise DeadlineExceeded(_TOO_LATE)
        if (
            bulk
            or (self._free(stream, caller) and not self._queued(stream, caller))
            or (not stream and self.max_wait_s <= 0)
        ):
            self._enter(caller, stream=stream, bulk=bulk)  # a free unit, or a refusal
            return
        queue = self._queues.get(caller)
        if not stream and queue is not None and len(queue) >= self.queue_per_caller:
            raise ResourceExhausted(
                f"this client already has {len(queue)} calls waiting at the server's "
                "concurrency limit; retry with backoff"
            )
        if queue is None:
            queue = self._queues[caller] = collections.deque()
            self._turns[caller] = None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(_Waiter(waiter, deadline, stream))
        self._count_waiting(stream, 1)
        timer = (
            None
            if stream
            else asyncio.get_running_loop().call_later(
                self.max_wait_s, self._expire, caller, waiter
            )
        )
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave(stream=stream, caller=caller)  # handed a unit as the call went away
            else:
                self._discard(caller, waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _count_waiting(self, stream: bool, n: int) -> None:
        self._waiting += n
        if not stream:
            self._waiting_calls += n

    def _discard(self, caller: str, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(caller)
        if queue is None:
            return  # already handed over or expired
        for item in queue:
            if item.future is waiter:
                queue.remove(item)
                break
        else:
            return
        self._count_waiting(item.stream, -1)
        self._unpark(caller)  # its next unit may be one no share holds back
        if not queue:
            del self._queues[caller]
            del self._turns[caller]

    def _expire(self, caller: str, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._discard(caller, waiter)
        waiter.set_exception(
            ResourceExhausted(
                f"waited {self.max_wait_s * 1000:g} ms at the server's concurrency limit; "
                "retry with backoff"
            )
        )

    def _hand_over(self) -> None:
        """Free units to the callers that wait, in turn. A caller whose next unit is a stream
        probe held back by its share of the limit, or its organisation's, is parked
        (:meth:`_park`) and passes its turn to a caller that can take a unit; it comes back
        at the head of the line when a unit of its share or its organisation's frees, or the
        shares grow. So a hand-over costs the callers it serves, not every caller that
        waits: passing turns round a line of every waiting caller cost 1.1 ms a completion
        with 1,000 cameras waiting, about half a decision's own CPU
        (``benchmarks/admission.py``)."""
        if self._parked_own or self._parked_org:
            shares = (self.share(), self.org_share())
            if shares[0] > self._shares[0] or shares[1] > self._shares[1]:
                self._unpark_all()
            self._shares = shares
        turns = self._turns
        while turns:
            caller = next(iter(turns))
            queue = self._queues[caller]
            item = queue[0]
            if not item.future.done() and not self._free(item.stream, caller):
                if self._at_ceiling():
                    return  # nothing can be handed over
                self._park(caller)
                continue
            queue.popleft()
            self._count_waiting(item.stream, -1)
            if queue:
                turns.move_to_end(caller)  # its next unit after every other caller's
            else:
                del turns[caller]
                del self._queues[caller]
            if item.future.done():
                continue  # a cancelled one (its task not yet resumed) takes none
            if self._too_late(item.deadline):
                item.future.set_exception(DeadlineExceeded(_TOO_LATE))  # the unit goes on
                continue
            self._take(item.stream, caller)
            item.future.set_result(None)

    def _park(self, caller: str) -> None:
        """Take ``caller``, whose next probe its share or its organisation's holds back, out
        of the line: with its own share full it waits for one of its own probes to end, else
        in its organisation's line for one of the organisation's. Parked at its own share
        while its organisation has room, it lets the organisation's next parked caller try."""
        del self._turns[caller]
        org = self._org(caller)
        share, org_share = self._shares = (self.share(), self.org_share())
        if self.held_by(caller) >= share:
            self._parked_own[caller] = None
            if self.held_by_org(org) < org_share:
                self._unpark_from(org)
        else:
            self._parked_org.setdefault(org, collections.OrderedDict())[caller] = None

    def _unpark(self, caller: str) -> None:
        """``caller`` back in the line, if parked."""
        if not self._unpark_own(caller):
            self._unpark_from(self._org(caller), caller)

    def _unpark_own(self, caller: str) -> bool:
        """``caller`` back in the line if parked at its own share; whether it was."""
        if caller not in self._parked_own:
            return False
        del self._parked_own[caller]
        self._first(caller)
        return True

    def _unpark_from(self, org: str, caller: str | None = None) -> None:
        """``caller``, or the first caller parked in ``org``'s line, back in the line."""
        line = self._parked_org.get(org)
        if not line or (caller is not None and caller not in line):
            return
        if caller is None:
            caller, _ = line.popitem(last=False)
        else:
            del line[caller]
        self._first(caller)
        if not line:
            del self._parked_org[org]

    def _first(self, caller: str) -> None:
        """``caller`` at the head of the line: it passed its turn only because a share held
        it back, so it has waited longer than any caller in the line."""
        self._turns[caller] = None
        self._turns.move_to_end(caller, last=False)

    def _unpark_all(self) -> None:
        """Every parked caller back in the line, ahead of the others: those parked at their own
        share first, then each organisation's line, each in the order parked."""
        parked = [*self._parked_own, *(c for line in self._parked_org.values() for c in line)]
        self._parked_own.clear()
        self._parked_org.clear()
        for caller in reversed(parked):
            self._first(caller)

    def leave(
        self,
        elapsed_s: float | None = None,
        *,
        stream: bool = False,
        bulk: bool = False,
        caller: str = "",
    ) -> None:
        """Give a unit back (a stream probe's, ``stream``, to ``caller``'s share);
        ``elapsed_s`` (its time in the service) feeds the adaptation."""
        if bulk:
            self.bulk -= 1
        else:
            self.count -= 1
            if stream:
                org = self._org(caller)
                _drop_one(self._org_held, org)
                _drop_one(self._held, caller)
                self._unpark_own(caller)  # a unit of its own share is free ...
                self._unpark_from(org)  # ... and one of its organisation's, for the first in line
            self._adapt(elapsed_s)
        self._hand_over()

    def _stale(self, now: float) -> bool:
        """No unloaded time, or its next measurement at the floor is due: ``PROBE_S`` after
        the last, or ``CONFIRM_S`` after a rise not yet confirmed (:meth:`_measured`)."""
        return bool(self.gain) and (self.unloaded_s is None or now >= self._measure_at)

    def _measured(self, mean: float, now: float) -> None:
        """A window at the floor measured ``mean``: the unloaded time, unless it is a rise
        not yet confirmed.

        A mean no higher than ``RISE`` times the value is taken, and next measured
        ``PROBE_S`` later. A higher one is not taken until a second measurement agrees with
        it (the two within ``RISE`` of each other, the lower then taken), each ``CONFIRM_S``
        after the last, at most ``CONFIRMS`` times; until then the value stays. The windows
        at the start of a flood measure its connections and streams opening: one came out at
        11 ms where the service takes 2.5 (session 19), and the confirmation a second later
        at 7 ms, which stood for ten seconds when the second measurement was taken as it
        came. A service that has really become slower is followed a second or two later. A
        rise left unconfirmed for ``PROBE_S`` (the clients stopped competing) is forgotten:
        a measurement much later confirms nothing about it."""
        self._measured_orgs = len(self._org_callers)
        value = self.unloaded_s
        rise = self._rise[0] if self._rise and now - self._rise[1] <= self.PROBE_S else None
        if value is None or mean <= self.RISE * value:
            self.unloaded_s, self._rise = mean, None
        elif rise is not None and (
            max(mean, rise) <= self.RISE * min(mean, rise) or self._confirms >= self.CONFIRMS
        ):
            self.unloaded_s, self._rise = min(mean, rise), None
        else:
            self._rise = (mean, now)
            self._confirms = 1 if rise is None else self._confirms + 1
            self._measure_at = now + self.CONFIRM_S
            return
        self._measure_at = now + self.PROBE_S

    def _start_probe(self, why: str = "") -> None:
        """Drain to the floor and measure the unloaded time there. ``why``: a caller's
        arrival (``_see``), logged here; ``_adapt`` logs its own windows' changes."""
        before = self.limit
        self.probing = True
        self._probe_armed = False
        self.limit = self.floor
        if why and before != self.limit:
            log.debug(
                "admission.limit",
                limit=self.limit,
                was=before,
                probing=True,
                why=why,
                callers=len(self._seen) + 1,
                orgs=len(self._org_callers),
            )

    def _drained(self) -> bool:
        """Every caller's and organisation's probes are down to its share of the floor."""
        return self.most_held <= self.share() and self.most_held_by_org <= self.org_share()

    def _adapt(self, elapsed_s: float | None) -> None:
        if elapsed_s is None:
            return
        now = self._clock()
        contended = len(self._seen) > 1
        if self.probing and not self._probe_armed:
            if not contended:
                # A lone caller is held at the ceiling only: its window would measure its own
                # load, so the probe waits for a second caller (``_see``).
                self.probing = False
            elif not self._drained():
                return  # still draining to the floor: these times are the loaded ones
            else:
                self._probe_armed = True
                self._reset(now)  # the probe's window starts with the next completion
                return
        self._units += 1
        self._total_s += elapsed_s
        length = now - self._window_start
        if self._units < self.WINDOW_UNITS or length < self.WINDOW_S:
            return
        mean = self._total_s / self._units
        self.expected_s = mean
        self._expected_at = now
        if not self.gain:  # a fixed limit: the mean is all a window gives
            self._reset(now)
            return
        self._rates.append((now, self._units / max(length, 1e-6)))
        while len(self._rates) > 1 and now - self._rates[0][0] > self.RATE_S:
            self._rates.popleft()
        before = self.limit
        if self.probing and contended:
            self._measured(mean, now)
        elif self.unloaded_s is not None and mean < self.unloaded_s:
            self.unloaded_s = mean  # lower, but not a measurement at the floor
        self.probing = False
        if contended and self._stale(now):
            self._start_probe()  # measure the unloaded time afresh, at the floor
        elif self.unloaded_s is not None:
            wanted = round(self.gain * self.rate * self.unloaded_s)
            self.limit = max(self.floor, min(self.ceiling, 2 * self.limit, wanted))
        if self.limit != before:
            log.debug(
                "admission.limit",
                limit=self.limit,
                was=before,
                probing=self.probing,
                callers=len(self._seen),
                orgs=len(self._org_callers),
                mean_ms=round(mean * 1000, 3),
                unloaded_ms=round((self.unloaded_s or 0.0) * 1000, 3),
                rate=round(self.rate, 1),
            )
        self._reset(now)
