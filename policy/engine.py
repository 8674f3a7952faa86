"""Policy engines behind one interface; the embedded one runs rego-cpp in process.

Invariants (DESIGN.md §5; LEGAL_RULES.md):

* ``decide`` never raises. An engine error, a timeout, an undefined or malformed result all
  read as a deny with reason ``ENGINE_UNAVAILABLE`` (fail closed).
* The embedded engine compiles the bundle once (and again only when the dynamic data
  changes) and evaluates through the compiled entry point ``centinela/decision``; it never
  re-parses a query per request.
* Threads never share rego-cpp state: the engine keeps a pool of *slots*, each its own
  compiled bundle and interpreter (rego-cpp interpreters hold per-query state and are not
  documented as thread-safe). A decision takes a slot, evaluates, and gives it back; the
  query runs with the GIL released, so several slots could decide in parallel (one by
  default: a second gave no gain on the busy 2-core test machine).
* New dynamic data is compiled into a whole new pool (tens to hundreds of ms, growing with
  the data), swapped in at once: a decision sees the old data or the new, never a mix.
* A decision blocks its thread for milliseconds (rego-cpp; see docs/policy.md): async
  callers run it in an executor.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from centinela.errors import ConfigError
from centinela.logs import get_logger
from centinela.policy import rego_native
from centinela.policy.bundle import ENTRYPOINT, Bundle
from centinela.policy.decision import ENGINE_UNAVAILABLE, Decision, parse_decision

_log = get_logger("policy")


@runtime_checkable
class PolicyEngine(Protocol):
    """What the server calls; see docs/policy.md for the input and output contract."""

    name: str

    @property
    def bundle_digest(self) -> str:
        """SHA-256 of the bundle this engine evaluates."""
        ...

    def decide(self, input: Mapping[str, Any]) -> Decision:
        """Decide one request; never raises (fails closed)."""
        ...

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        """Replace ``data.dynamic`` (sites, authorisations).

        Raises:
            ConfigError: the document is not an object of objects.
            PolicyEngineUnavailable: the engine could not take the new data.
        """
        ...


def check_dynamic(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a ``data.dynamic`` document.

    ``sites`` and ``authorisations`` default to empty; ``models`` (gallery -> model id the
    gallery holds, optional) overrides data.json's ``model_id`` for R13.

    Raises:
        ConfigError: not a mapping, ``sites``/``authorisations`` not mappings, or ``models``
            not a mapping of strings.
    """
    if not isinstance(doc, Mapping):
        raise ConfigError("dynamic policy data must be an object")
    out = dict(doc)
    for key in ("sites", "authorisations"):
        value = out.setdefault(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"dynamic policy data: {key} must be an object")
        out[key] = dict(value)
    models = out.get("models")
    if models is not None and (
        not isinstance(models, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items())
    ):
        raise ConfigError("dynamic policy data: models must map gallery names to model ids")
    return out


class _Slot:
    """One compiled bundle with its own interpreter; used by one thread at a time."""

    def __init__(self, builder: rego_native.Interpreter, compiled: rego_native.Bundle) -> None:
        self.builder = builder  # keeps the compiled bundle's interpreter alive
        self.compiled = compiled
        self.runner = rego_native.Interpreter()


class EmbeddedEngine:
    """rego-cpp (regopy) in process, through the bundle's compiled entry point."""

    name = "embedded"

    def __init__(
        self, bundle: Bundle, dynamic: Mapping[str, Any] | None = None, *, slots: int | None = None
    ) -> None:
        """Compile ``bundle`` with ``dynamic`` data (default: no sites, no authorisations).

        ``slots`` is how many decisions may run at once; each slot holds its own compiled
        copy of the bundle. Default 1: on the 2-core test machine two slots gave no more
        decisions/s than one (docs/policy.md), so the extra memory buys nothing there.

        Raises:
            ConfigError: the bundle does not compile.
        """
        self._bundle = bundle
        self._floors = bundle.floors()
        self._slots = max(1, slots if slots is not None else 1)
        self._swap = threading.Lock()
        self._dynamic = check_dynamic(dynamic or {})
        self._pool = self._build_pool(self._dynamic)

    @property
    def bundle(self) -> Bundle:
        """The bundle being evaluated."""
        return self._bundle

    @property
    def bundle_digest(self) -> str:
        return self._bundle.digest

    @property
    def dynamic(self) -> dict[str, Any]:
        """The ``data.dynamic`` document in force."""
        return self._dynamic

    def _compile(self, dynamic: Mapping[str, Any]) -> _Slot:
        try:
            builder, compiled = rego_native.compile_bundle(
                self._bundle.policy_modules, [self._bundle.data, {"dynamic": dynamic}], [ENTRYPOINT]
            )
        except rego_native.RegoFailure as exc:
            raise ConfigError(f"policy bundle {self._bundle.name} does not compile: {exc}") from exc
        slot = _Slot(builder, compiled)
        # The first query converts the compiled node into its runnable form, once; do it
        # here, single-threaded.
        try:
            rego_native.set_input(slot.runner, {})
            rego_native.query_entrypoint(slot.runner, compiled, ENTRYPOINT)
        except (rego_native.RegoFailure, ValueError) as exc:
            raise ConfigError(
                f"policy bundle {self._bundle.name} does not evaluate: {exc}"
            ) from exc
        return slot

    def _build_pool(self, dynamic: Mapping[str, Any]) -> queue.SimpleQueue[_Slot]:
        pool: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(self._slots):
            pool.put(self._compile(dynamic))
        return pool

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        dynamic = check_dynamic(doc)
        pool = self._build_pool(dynamic)  # decisions go on meanwhile, on the old pool
        with self._swap:
            self._pool, self._dynamic = pool, dynamic

    def evaluate_raw(self, input: Any) -> Any:
        """The raw entry-point value for ``input`` (``None`` when undefined).

        Raises:
            RegoFailure: engine error. ValueError: input not representable.
        """
        pool = self._pool
        slot = pool.get()
        try:
            rego_native.set_input(slot.runner, input)
            return rego_native.query_entrypoint(slot.runner, slot.compiled, ENTRYPOINT)
        finally:
            pool.put(slot)

    def decide(self, input: Mapping[str, Any]) -> Decision:
        digest = self._bundle.digest
        try:
            raw = self.evaluate_raw(input)
        except (rego_native.RegoFailure, ValueError, RecursionError) as exc:
            _log.error(
                "policy_engine_error", engine=self.name, bundle=digest, error=type(exc).__name__
            )
            return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        if raw is None:
            _log.error("policy_undefined", engine=self.name, bundle=digest)
            return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        return parse_decision(raw, digest, self.name, self._floors)
