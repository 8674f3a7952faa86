"""Admission under overload: bound the queue in front of the service, not only the work in it.

Two bounds shed what the server cannot serve in time:

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

from centinela.config import Settings
from centinela.errors import ConfigError, ResourceExhausted

#: gRPC core channel arguments (``src/core/server/server.h``).
MAX_PENDING = "grpc.server.max_pending_requests"
MAX_PENDING_HARD = "grpc.server.max_pending_requests_hard_limit"


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server options that bound the waiting queue.

    Raises:
        ConfigError: a limit is not positive.
    """
    if settings.max_concurrent_rpcs < 1:
        raise ConfigError("max_concurrent_rpcs must be at least 1")
    if settings.max_pending_rpcs < 2:
        raise ConfigError("max_pending_rpcs must be at least 2")
    return [
        (MAX_PENDING, settings.max_pending_rpcs // 2),
        (MAX_PENDING_HARD, settings.max_pending_rpcs),
    ]


class InFlight:
    """Work admitted and not yet answered, against the ``max_concurrent_rpcs`` ceiling.

    A unit is a unary call, a client-streamed import, an export, or **one message** of a
    StreamMatch: a portico's stream stays open all day and is idle between captures, so it
    holds a unit only while one of its probes is being decided (a thousand open streams must
    not lock unary callers out). Everything runs on the server's event loop: no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def check(self) -> None:
        """Refuse new work at the ceiling, without taking a unit (a stream that opens).

        Raises:
            ResourceExhausted: the ceiling is reached.
        """
        if self.count >= self.limit:
            raise ResourceExhausted("server is at its concurrency ceiling; retry with backoff")

    def enter(self) -> None:
        """Take a unit.

        Raises:
            ResourceExhausted: the ceiling is reached.
        """
        self.check()
        self.count += 1

    def leave(self) -> None:
        """Give a unit back."""
        self.count -= 1
