"""A cache of policy decisions, reused across the request times and probe qualities its
policy says do not matter.

Why: the embedded Rego engine (rego-cpp) costs ~3-5 ms of CPU per decision on this policy
(see docs/policy.md), far more than the rest of a MatchFace. A portico sends many probes a
second whose policy inputs are identical but for their times (``context.now``,
``context.capture_time``) and probe quality, so the decision is computed once and reused.

Until session 21 the key was the whole input with the times at one-second resolution: every
camera paid a full evaluation at least once a second, ~22 cores' worth at 3,000 cameras
(benchmarks/decision_cache.py). Now the policy itself says where those numbers matter: each
decision carries ``instants``, the values a rule compares each of them with
(policy/rego/*/request.rego). All else equal the decision holds for any value strictly
between two neighbouring instants (:func:`~centinela.policy.span`). A municipal alert
search compares no time with anything and the quality with its floor only, so one decision
serves a camera until the data or the bundle changes.

Invariants:

* Two requests share a decision only if everything but those numbers is the same JSON, and
  each number lies where both the active and the shadow decision hold. A number a decision
  declared nothing for must equal the one it was taken at.
* A time is reusable only in the server's own canonical form (``YYYY-MM-DDTHH:MM:SS+00:00``,
  years 1971-2261, which the engines parse exactly as Python does), a quality only on the
  server's own 0.05 steps from 0 to 1 (rego-cpp reads input floats to six decimals). Any
  other value stays in the key as it is: the engine is asked again for it.
* A change of dynamic data (sites, authorisations, gallery models) drops every decision
  that looked up a changed entry, as its ``reads`` say (policy/rego/*/request.rego), and
  every decision that does not say what it read. Others stay: a new camera of one
  municipality costs the other cameras nothing (it cost every camera one evaluation
  before session 22). A bundle reload clears the cache. Both happen after the engines
  hold the new data and before a decision started earlier may be stored.
* Each request still gets its own decision id and its own audit entry; only the engine's
  evaluation is shared. Denials that depend on the engine failing (``ENGINE_UNAVAILABLE``)
  are never cached, so a recovered engine is asked again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from centinela.policy import (
    INSTANT_FIELDS,
    Decision,
    PolicyService,
    ShadowedDecision,
    holds,
    span,
)
from centinela.policy.decision import DYNAMIC_SECTIONS, Number, Reads, Span, is_number

#: The one time format a cached decision is reused across: what the server's inputs hold.
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")
#: Within int64 nanoseconds (1677-2262) with a margin: the engines parse these exactly.
_YEARS = range(1971, 2262)
#: Decisions kept per input that differ only in those numbers (a judicial authorisation's
#: window splits time in five spans; a policy without instants needs one per second).
PER_INPUT = 8
#: Probe quality reaches the policy in steps of 1/QUALITY_STEPS (0.05).
QUALITY_STEPS = 20
#: The index key of a decision that does not say what it read (no section is named "").
_ANYTHING = ("", "")
#: (section, key) of each field, e.g. "context.now" -> ("context", "now").
_PATHS = {name: tuple(name.split(".", 1)) for name in INSTANT_FIELDS}


def canonical_ns(value: Any) -> int | None:
    """Nanoseconds since the epoch of a time in the canonical form, else ``None``."""
    if not isinstance(value, str) or not _CANONICAL.fullmatch(value):
        return None
    try:
        when = dt.datetime.fromisoformat(value)  # refuses 30 February, a 60th second
    except ValueError:
        return None
    return int(when.timestamp()) * 1_000_000_000 if when.year in _YEARS else None


def quality_step(quality: float) -> float:
    """A probe quality rounded *down* to the step the server gives the policy (never more
    permissive than the real value, R13)."""
    return math.floor(quality * QUALITY_STEPS) / QUALITY_STEPS


def _reusable(name: str, value: Any) -> Number | None:
    if INSTANT_FIELDS[name]:
        return canonical_ns(value)
    # A quality only on the server's own steps: the embedded engine reads input floats to
    # six decimals, so a decision is never carried to a value it would not see exactly.
    if (
        is_number(value)
        and 0 <= value <= 1
        and round(value * QUALITY_STEPS) / QUALITY_STEPS == value
    ):
        number: Number = value
        return number
    return None


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """The input without its reusable numbers, and those numbers."""

    #: Canonical JSON of the input, each reusable number blanked, with their names.
    rest: str
    #: (name, value) of each reusable number, in INSTANT_FIELDS order.
    values: tuple[tuple[str, Number], ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
    spans: tuple[Span, ...]  # aligned with CacheKey.values
    at: tuple[tuple[str, Number], ...]  # the values the decision was taken at
    result: ShadowedDecision
    reads: Reads | None  # what the active and the shadow decision read; None: anything

    def reads_any(self, changed: Reads) -> bool:
        if self.reads is None:
            return True
        return any(keys & self.reads.get(section, frozenset()) for section, keys in changed.items())

    def holds_at(self, values: tuple[tuple[str, Number], ...]) -> bool:
        return all(
            holds(where, at, value)
            for where, (_, at), (_, value) in zip(self.spans, self.at, values, strict=True)
        )


def _span(decision: Decision | None, name: str, value: Number) -> Span:
    if decision is None:
        return (None, None)
    instants = decision.instants.get(name)
    return None if instants is None else span(instants, value)


def spans(result: ShadowedDecision, values: tuple[tuple[str, Number], ...]) -> tuple[Span, ...]:
    """For each number, where both the active and the shadow decision hold."""
    out: list[Span] = []
    for name, value in values:
        a, b = _span(result.active, name, value), _span(result.shadow, name, value)
        if a is None or b is None:
            out.append(None)
            continue
        los = [x for x in (a[0], b[0]) if x is not None]
        his = [x for x in (a[1], b[1]) if x is not None]
        out.append((max(los) if los else None, min(his) if his else None))
    return tuple(out)


def reads(result: ShadowedDecision) -> Reads | None:
    """What the active and the shadow decision read between them (``None``: anything)."""
    decisions = [d for d in (result.active, result.shadow) if d is not None]
    if any(d.reads is None for d in decisions):
        return None
    out: dict[str, frozenset[str]] = {}
    for d in decisions:
        for section, keys in (d.reads or {}).items():
            out[section] = out.get(section, frozenset()) | keys
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> Reads | None:
    """The keys of each section of ``data.dynamic`` whose entry differs between ``old`` and
    ``new`` (added, removed or changed), or ``None`` when something else differs: a section
    that is not an object, or a part outside :data:`DYNAMIC_SECTIONS`."""
    rest = set(old) | set(new)
    if any(old.get(k) != new.get(k) for k in rest - set(DYNAMIC_SECTIONS)):
        return None
    out: dict[str, frozenset[str]] = {}
    for section in DYNAMIC_SECTIONS:
        a, b = old.get(section), new.get(section)
        if a == b:
            continue
        if not isinstance(a, Mapping) or not isinstance(b, Mapping):
            return None  # a section appeared, went or is not an object: no entry says what
        missing = object()
        out[section] = frozenset(
            k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing)
        )
    return out


class DecisionCache:
    """LRU of ``ShadowedDecision`` by input without its reusable numbers; thread-safe."""

    def __init__(self, policy: PolicyService, max_entries: int = 50_000) -> None:
        self.policy = policy
        #: Inputs (without their numbers) kept; each keeps up to PER_INPUT decisions.
        self.max_entries = max_entries
        self._lru: OrderedDict[str, list[_Entry]] = OrderedDict()
        # Which inputs hold a decision that read an entry, so that a change of data looks
        # at those only (a scan of every decision held the lock ~1.7 µs a decision: 8 ms at
        # 3,000 cameras, ~0.7 s full). Over-approximate: a dropped decision's keys stay
        # until its input goes.
        # A decision that says nothing of what it read is filed under _ANYTHING.
        self._by_read: dict[tuple[str, str], set[str]] = {}
        self._indexed: dict[str, set[tuple[str, str]]] = {}  # input -> its keys above
        self._lock = threading.Lock()
        self._generation = 0
        self.hits = 0
        self.misses = 0
        #: Decisions dropped by :meth:`invalidate` for a change of data they read.
        self.dropped = 0

    def clear(self) -> None:
        """Forget every decision (after a bundle changed)."""
        self.invalidate(None)

    def invalidate(self, changed: Reads | None) -> None:
        """Forget the decisions that read an entry of ``data.dynamic`` in ``changed``
        (section -> keys, :func:`changes`), and those that do not say what they read;
        ``None`` forgets every decision. A decision being taken meanwhile is not stored."""
        with self._lock:
            self._generation += 1
            if changed is None:
                self.dropped += sum(len(entries) for entries in self._lru.values())
                self._lru.clear()
                self._by_read.clear()
                self._indexed.clear()
                return
            candidates = set(self._by_read.get(_ANYTHING, ()))
            for section, keys in changed.items():
                for k in keys:
                    candidates |= self._by_read.get((section, k), set())
            for rest in candidates:
                entries = self._lru.get(rest)
                if entries is None:
                    continue
                kept = [e for e in entries if not e.reads_any(changed)]
                self.dropped += len(entries) - len(kept)
                if not kept:
                    del self._lru[rest]
                    self._unindex(rest)
                elif len(kept) < len(entries):
                    entries[:] = kept

    def _index(self, rest: str, entry: _Entry) -> None:
        mine = self._indexed.setdefault(rest, set())
        if entry.reads is None:
            read_keys = [_ANYTHING]
        else:
            read_keys = [(section, k) for section, keys in entry.reads.items() for k in keys]
        for read in read_keys:
            self._by_read.setdefault(read, set()).add(rest)
            mine.add(read)

    def _unindex(self, rest: str) -> None:
        for read in self._indexed.pop(rest, ()):
            rests = self._by_read.get(read)
            if rests is not None:
                rests.discard(rest)
                if not rests:
                    del self._by_read[read]

    @staticmethod
    def key(policy_input: Mapping[str, Any]) -> CacheKey:
        """The cache key: the input's reusable numbers apart, the rest as canonical JSON."""
        values: list[tuple[str, Number]] = []
        doc: dict[str, Any] = dict(policy_input)
        for name, (section, field) in _PATHS.items():
            part = doc.get(section)
            if not isinstance(part, Mapping) or field not in part:
                continue
            value = _reusable(name, part[field])
            if value is not None:
                values.append((name, value))
                doc[section] = {**part, field: ""}
        # The names go into the key: an input whose number is literally "" stays apart.
        rest = json.dumps(
            [[name for name, _ in values], doc], sort_keys=True, separators=(",", ":"), default=str
        )
        return CacheKey(rest, tuple(values))

    def _find(self, key: CacheKey) -> ShadowedDecision | None:
        entries = self._lru.get(key.rest)
        if entries is None:
            return None
        for i, entry in enumerate(entries):
            if entry.holds_at(key.values):
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
        result = self.policy.decide(policy_input, tally=False)  # tallied per request
        if "ENGINE_UNAVAILABLE" in result.active.reasons:
            return result
        entry = _Entry(spans(result, key.values), key.values, result, reads(result))
        with self._lock:
            if generation == self._generation:
                entries = self._lru.get(key.rest)
                if entries is None:
                    entries = self._lru[key.rest] = []
                    if len(self._lru) > self.max_entries:
                        gone, _ = self._lru.popitem(last=False)
                        self._unindex(gone)
                else:
                    self._lru.move_to_end(key.rest)
                entries.insert(0, entry)
                del entries[PER_INPUT:]
                self._index(key.rest, entry)
        return result
