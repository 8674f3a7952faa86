"""Request-rate counters per caller and per site, for the policy's rate ceilings (R14).

The server counts; the policy decides. Each request is counted in a sliding window of 60 s
(6 buckets of 10 s) before the policy sees it, so the policy input carries "requests in the
last minute, this one included". Counts live in the server's memory, which is correct
because one server process serves a database (``centinela.server.instance`` refuses a
second); replicas behind a balancer would need the counts shared (``deploy/README.md``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

BUCKET_S = 10.0
BUCKETS = 6


class SlidingCounter:
    """Counts events per key over the last ``BUCKET_S * BUCKETS`` seconds."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._buckets: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def hit(self, key: str) -> int:
        """Count one event for ``key``; return the events in the window, this one included."""
        now = int(self._clock() // BUCKET_S)
        with self._lock:
            buckets = [(b, c) for b, c in self._buckets[key] if b > now - BUCKETS]
            if buckets and buckets[-1][0] == now:
                buckets[-1] = (now, buckets[-1][1] + 1)
            else:
                buckets.append((now, 1))
            self._buckets[key] = buckets
            if len(self._buckets) > 100_000:
                self._evict(now)
            return sum(c for _, c in buckets)

    def _evict(self, now: int) -> None:
        stale = [k for k, v in self._buckets.items() if not v or v[-1][0] <= now - BUCKETS]
        for k in stale:
            del self._buckets[k]


class RateCounters:
    """The two counters the policy input needs."""

    def __init__(self) -> None:
        self.callers = SlidingCounter()
        self.sites = SlidingCounter()

    def observe(self, caller: str, site_id: str) -> dict[str, int]:
        """Count a request; return the policy input's ``rate`` document."""
        return {
            "caller_per_minute": self.callers.hit(caller),
            "site_per_minute": self.sites.hit(site_id) if site_id else 0,
        }
