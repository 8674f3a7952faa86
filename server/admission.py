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
  :class:`~centinela.server.interceptors.CentinelaInterceptor`): beyond it work that reached
  the service is answered at once with RESOURCE_EXHAUSTED. A unit is a call, or one probe of
  a StreamMatch (an open, idle stream holds none).
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
rising probability (random early detection), beyond it every new call is refused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from centinela.config import Settings
from centinela.errors import ConfigError, ResourceExhausted
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
    if not 0.0 <= settings.admission_target_ms < 3_600_000:
        raise ConfigError("admission_target_ms must be 0 (off) or a positive number of ms")
    if settings.max_streams_per_connection < 0:
        raise ConfigError("max_streams_per_connection must be 0 (no limit) or positive")
    options = [
        (MAX_PENDING, settings.max_pending_rpcs // 2),
        (MAX_PENDING_HARD, settings.max_pending_rpcs),
    ]
    if settings.max_streams_per_connection:
        options.append((MAX_STREAMS, settings.max_streams_per_connection))
    return options


#: The adaptive limit never goes below this many units.
MIN_LIMIT = 32


class InFlight:
    """Work admitted and not yet answered, against an adaptive in-flight limit.

    A unit is a unary call, a client-streamed import, an export, or **one message** of a
    StreamMatch: a portico's stream stays open all day and is idle between captures, so it
    holds a unit only while one of its probes is being decided (a thousand open streams must
    not lock unary callers out). A call at the limit is refused (RESOURCE_EXHAUSTED); a
    stream's probe at the limit waits for a unit (:meth:`acquire`), and its stream is not
    read meanwhile: backpressure, as HTTP/2 flow control means it.

    **Adaptive limit.** A fixed ceiling keeps memory bounded but not latency: at ten times
    the capacity, 256 calls in flight on a loop that serves ~300/s each wait ~0.9 s. So the
    limit follows the time admitted work spends in the service (Little's law: the work in
    flight that the loop can serve within ``target_s``), per window of at least
    ``WINDOW_UNITS`` completions and ``WINDOW_S`` seconds:

    * mean above ``target_s``: the limit shrinks by a quarter (never below ``floor``, 32 by
      default: the concurrency one client process drives, so a service that is slower than
      the target even when idle still serves that many at once);
    * otherwise, if the limit was reached in the window (demand wants more): it grows by an
      eighth (at least one; never above ``ceiling``).

    This is AIMD on latency, the loop of TCP congestion control and of Netflix's
    concurrency-limits, in its simplest form. ``target_s`` 0 keeps the ceiling fixed.
    Everything runs on the server's event loop: no lock.
    """

    WINDOW_UNITS = 32
    WINDOW_S = 0.25

    def __init__(
        self,
        ceiling: int,
        *,
        target_s: float = 0.0,
        floor: int = MIN_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.ceiling = ceiling
        self.limit = ceiling
        self.floor = min(floor, ceiling)
        self.target_s = target_s
        self.count = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reset(clock())

    @property
    def waiting(self) -> int:
        """Stream probes waiting for a unit."""
        return len(self._waiters)

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._units = 0
        self._total_s = 0.0
        self._saturated = False

    def check(self) -> None:
        """Refuse new work at the limit, without taking a unit (a stream that opens).

        Raises:
            ResourceExhausted: the limit is reached.
        """
        if self.count >= self.limit:
            self._saturated = True
            raise ResourceExhausted("server is at its concurrency limit; retry with backoff")

    def enter(self) -> None:
        """Take a unit.

        Raises:
            ResourceExhausted: the limit is reached.
        """
        self.check()
        self.count += 1
        if self.count >= self.limit:
            self._saturated = True

    async def acquire(self) -> None:
        """Take a unit, waiting for one at the limit (first come, first served).

        For the probes of a stream: while one waits, its stream is not read, so HTTP/2 flow
        control holds the portico back (backpressure) instead of a probe being refused.
        """
        if self.count < self.limit and not self._waiters:
            self.enter()
            return
        self._saturated = True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a unit just as the stream went away: give it back
            else:
                self._waiters.remove(waiter)
            raise

    def _hand_over(self) -> None:
        while self._waiters and self.count < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.count += 1
                waiter.set_result(None)

    def leave(self, elapsed_s: float | None = None) -> None:
        """Give a unit back; ``elapsed_s`` (its time in the service) feeds the adaptation."""
        self.count -= 1
        self._adapt(elapsed_s)
        self._hand_over()

    def _adapt(self, elapsed_s: float | None) -> None:
        if not self.target_s or elapsed_s is None:
            return
        self._units += 1
        self._total_s += elapsed_s
        now = self._clock()
        if self._units < self.WINDOW_UNITS or now - self._window_start < self.WINDOW_S:
            return
        mean = self._total_s / self._units
        before = self.limit
        if mean > self.target_s:
            self.limit = max(self.floor, self.limit * 3 // 4)
        elif self._saturated:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 8))
        if self.limit != before:
            log.debug("admission.limit", limit=self.limit, was=before, mean_ms=mean * 1000)
        self._reset(now)
