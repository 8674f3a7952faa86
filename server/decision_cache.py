"""A cache of policy decisions keyed by the exact policy input.

Why: the embedded Rego engine (rego-cpp) costs ~5 ms of CPU per decision on this policy
(see docs/policy.md), far more than the rest of a MatchFace. A portico sends many probes a
second whose policy inputs are identical once the per-request noise is taken out, so the
decision is computed once and reused.

Invariants:

* The key is the canonical JSON of the *whole* input the engine sees. Nothing is guessed:
  two requests share a decision only if the engine would have been asked the very same
  question. The server makes inputs repeatable by construction — times at one-second
  resolution, probe quality rounded *down* to 0.05 (never more permissive), the request
  rate enforced by the server against the policy's own ``rate_ceiling`` obligation (R14)
  instead of being an input.
* Any change of what the engines know — dynamic data (sites, authorisations), a bundle
  reload — clears the cache before the next decision.
* Each request still gets its own decision id and its own audit entry; only the engine's
  evaluation is shared. Denials that depend on the engine failing (``ENGINE_UNAVAILABLE``)
  are never cached, so a recovered engine is asked again.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from centinela.policy import PolicyService, ShadowedDecision


class DecisionCache:
    """LRU of ``ShadowedDecision`` by canonical input; thread-safe."""

    def __init__(self, policy: PolicyService, max_entries: int = 50_000) -> None:
        self.policy = policy
        self.max_entries = max_entries
        self._lru: OrderedDict[str, ShadowedDecision] = OrderedDict()
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
    def key(policy_input: Mapping[str, Any]) -> str:
        """The cache key: canonical JSON of the whole input."""
        return json.dumps(policy_input, sort_keys=True, separators=(",", ":"), default=str)

    def cached(self, key: str) -> ShadowedDecision | None:
        """The decision stored under ``key``, or ``None``; never calls the engine.

        Cheap enough for the event loop: a hit needs no executor round trip.
        """
        with self._lock:
            found = self._lru.get(key)
            if found is not None:
                self._lru.move_to_end(key)
                self.hits += 1
            return found

    def decide(self, policy_input: Mapping[str, Any], key: str | None = None) -> ShadowedDecision:
        """The engine's decision for this exact input, from the cache when possible."""
        if key is None:
            key = self.key(policy_input)
        with self._lock:
            found = self._lru.get(key)
            if found is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return found
            generation = self._generation
            self.misses += 1
        result = self.policy.decide(policy_input)
        if "ENGINE_UNAVAILABLE" in result.active.reasons:
            return result
        with self._lock:
            if generation == self._generation:
                self._lru[key] = result
                if len(self._lru) > self.max_entries:
                    self._lru.popitem(last=False)
        return result
