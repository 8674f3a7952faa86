"""A cache of policy decisions, reused for the request times the policy says do not matter.

Why: the embedded Rego engine (rego-cpp) costs ~3-5 ms of CPU per decision on this policy
(see docs/policy.md), far more than the rest of a MatchFace. A portico sends many probes a
second whose policy inputs are identical but for their times (``context.now``,
``context.capture_time``), so the decision is computed once and reused.

Until session 21 the key was the whole input with the times at one-second resolution: every
camera paid a full evaluation at least once a second, ~9-15 cores' worth at 3,000 cameras.
Now the policy itself says where time matters: each decision carries ``time_instants``, the
instants at which a rule compares a time with something else (policy/rego/*/request.rego).
All else equal the decision holds for any time strictly between two neighbouring instants
(:func:`~centinela.policy.time_span`); a portico outside any judicial authorisation's
window has none, so one decision serves it until the data or the bundle changes.

Invariants:

* Two requests share a decision only if everything but the times is the same JSON, and each
  time lies in the span both the active and the shadow decision declared for it. A time the
  decision declared nothing for must be equal to the one it was taken at.
* A time is reusable only in the server's own canonical form (``YYYY-MM-DDTHH:MM:SS+00:00``,
  years 1971-2261, which the engines parse exactly as Python does). Any other value stays in
  the key as it is: the engine is asked again for anything else.
* Any change of what the engines know — dynamic data (sites, authorisations), a bundle
  reload — clears the cache before the next decision.
* Each request still gets its own decision id and its own audit entry; only the engine's
  evaluation is shared. Denials that depend on the engine failing (``ENGINE_UNAVAILABLE``)
  are never cached, so a recovered engine is asked again.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from centinela.policy import TIME_FIELDS, Decision, PolicyService, ShadowedDecision, time_span

#: The one time format a cached decision is reused across: what the server's inputs hold.
_CANONICAL = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\+00:00")
#: Within int64 nanoseconds (1677-2262) with a margin: the engines parse these exactly.
_YEARS = range(1971, 2262)
#: Decisions kept per input that differ only in their times (a judicial authorisation's
#: window splits time in at most five spans; a policy without instants gives one per second).
PER_INPUT = 8

Span = tuple[int | None, int | None]


def canonical_ns(value: Any) -> int | None:
    """Nanoseconds since the epoch of a time in the canonical form, else ``None``."""
    if not isinstance(value, str):
        return None
    m = _CANONICAL.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups())
    if year not in _YEARS or not (1 <= month <= 12 and hour < 24 and minute < 60):
        return None
    if not 1 <= day <= calendar.monthrange(year, month)[1] or second > 59:
        return None
    return calendar.timegm((year, month, day, hour, minute, second)) * 1_000_000_000


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """The input without its reusable times, and those times."""

    #: Canonical JSON of the input, each reusable time replaced by the names list's marker.
    rest: str
    #: (name, ns) of each reusable time, in TIME_FIELDS order.
    times: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
    spans: tuple[Span, ...]  # aligned with CacheKey.times
    result: ShadowedDecision

    def holds_at(self, times: tuple[tuple[str, int], ...]) -> bool:
        for (lo, hi), (_, t) in zip(self.spans, times, strict=True):
            if (lo is not None and t < lo) or (hi is not None and t > hi):
                return False
        return True


def _span(decision: Decision | None, name: str, t: int) -> Span:
    if decision is None:
        return (None, None)
    instants = decision.time_instants.get(name)
    return (t, t) if instants is None else time_span(instants, t)


def spans(result: ShadowedDecision, times: tuple[tuple[str, int], ...]) -> tuple[Span, ...]:
    """For each time, the span over which both the active and the shadow decision hold."""
    out: list[Span] = []
    for name, t in times:
        a_lo, a_hi = _span(result.active, name, t)
        s_lo, s_hi = _span(result.shadow, name, t)
        lo = s_lo if a_lo is None else a_lo if s_lo is None else max(a_lo, s_lo)
        hi = s_hi if a_hi is None else a_hi if s_hi is None else min(a_hi, s_hi)
        out.append((lo, hi))
    return tuple(out)


class DecisionCache:
    """LRU of ``ShadowedDecision`` by input without its times; thread-safe."""

    def __init__(self, policy: PolicyService, max_entries: int = 50_000) -> None:
        self.policy = policy
        #: Inputs (without their times) kept; each keeps up to PER_INPUT decisions.
        self.max_entries = max_entries
        self._lru: OrderedDict[str, list[_Entry]] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Forget every decision (after dynamic data or bundles changed)."""
        with self._lock:
            self._lru.clear()
            self._generation += 1

    @staticmethod
    def key(policy_input: Mapping[str, Any]) -> CacheKey:
        """The cache key: the input's reusable times apart, the rest as canonical JSON."""
        ctx = policy_input.get("context")
        times: list[tuple[str, int]] = []
        doc: Any = policy_input
        if isinstance(ctx, Mapping):
            for name in TIME_FIELDS:
                ns = canonical_ns(ctx.get(name))
                if ns is not None:
                    times.append((name, ns))
            if times:
                marked = {name: "" for name, _ in times}
                doc = {**policy_input, "context": {**ctx, **marked}}
        # The names go into the key: an input whose time is literally "" stays apart.
        rest = json.dumps(
            [[name for name, _ in times], doc], sort_keys=True, separators=(",", ":"), default=str
        )
        return CacheKey(rest, tuple(times))

    def _find(self, key: CacheKey) -> ShadowedDecision | None:
        entries = self._lru.get(key.rest)
        if entries is None:
            return None
        for i, entry in enumerate(entries):
            if entry.holds_at(key.times):
                self._lru.move_to_end(key.rest)
                if i:
                    entries.insert(0, entries.pop(i))
                self.hits += 1
                return entry.result
        return None

    def cached(self, key: CacheKey) -> ShadowedDecision | None:
        """The decision that holds for ``key``, or ``None``; never calls the engine.

        Cheap enough for the event loop: a hit needs no executor round trip.
        """
        with self._lock:
            return self._find(key)

    def decide(
        self, policy_input: Mapping[str, Any], key: CacheKey | None = None
    ) -> ShadowedDecision:
        """The engine's decision for this input, from the cache when one holds."""
        if key is None:
            key = self.key(policy_input)
        with self._lock:
            found = self._find(key)
            if found is not None:
                return found
            generation = self._generation
            self.misses += 1
        result = self.policy.decide(policy_input)
        if "ENGINE_UNAVAILABLE" in result.active.reasons:
            return result
        entry = _Entry(spans(result, key.times), result)
        with self._lock:
            if generation == self._generation:
                entries = self._lru.get(key.rest)
                if entries is None:
                    entries = self._lru[key.rest] = []
                    if len(self._lru) > self.max_entries:
                        self._lru.popitem(last=False)
                else:
                    self._lru.move_to_end(key.rest)
                entries.insert(0, entry)
                del entries[PER_INPUT:]
        return result
