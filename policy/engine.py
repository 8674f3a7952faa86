"""Policy engines behind one interface; the embedded one runs rego-cpp in process.

Invariants (DESIGN.md §5; LEGAL_RULES.md):

* ``decide`` never raises. An engine error, a timeout, an undefined or malformed result all
  read as a deny with reason ``ENGINE_UNAVAILABLE`` (fail closed).
* The embedded engine compiles the bundle once (and again only when the dynamic data
  changes) and evaluates through the compiled entry point ``centinela/decision``; it never
  re-parses a query per request.
* The compiled bundle and its interpreter are used under one lock: rego-cpp interpreters
  hold per-query state and are not documented as thread-safe. The swap to a recompiled
  bundle is atomic: a decision sees the old data or the new, never a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import regopy

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

    Raises:
        ConfigError: not a mapping, or ``sites``/``authorisations`` not mappings.
    """
    if not isinstance(doc, Mapping):
        raise ConfigError("dynamic policy data must be an object")
    out = dict(doc)
    for key in ("sites", "authorisations"):
        value = out.setdefault(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"dynamic policy data: {key} must be an object")
        out[key] = dict(value)
    return out


class EmbeddedEngine:
    """rego-cpp (regopy) in process, through the bundle's compiled entry point."""

    name = "embedded"

    def __init__(self, bundle: Bundle, dynamic: Mapping[str, Any] | None = None) -> None:
        """Compile ``bundle`` with ``dynamic`` data (default: no sites, no authorisations).

        Raises:
            ConfigError: the bundle does not compile.
        """
        self._bundle = bundle
        self._floors = bundle.floors()
        self._lock = threading.Lock()
        self._dynamic = check_dynamic(dynamic or {})
        self._interp, self._compiled = self._compile(self._dynamic)
        self._runner = regopy.Interpreter()

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

    def _compile(self, dynamic: Mapping[str, Any]) -> tuple[regopy.Interpreter, regopy.Bundle]:
        try:
            interp, compiled = rego_native.compile_bundle(
                self._bundle.policy_modules, [self._bundle.data, {"dynamic": dynamic}], [ENTRYPOINT]
            )
        except rego_native.RegoFailure as exc:
            raise ConfigError(f"policy bundle {self._bundle.name} does not compile: {exc}") from exc
        # The first query converts the compiled node into the runnable form, once; do it here
        # so that two threads never race on that conversion.
        warm = regopy.Interpreter()
        try:
            rego_native.set_input(warm, {})
            rego_native.query_entrypoint(warm, compiled, ENTRYPOINT)
        except (rego_native.RegoFailure, ValueError) as exc:
            raise ConfigError(f"policy bundle {self._bundle.name} does not evaluate: {exc}") from exc
        return interp, compiled

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        dynamic = check_dynamic(doc)
        interp, compiled = self._compile(dynamic)  # outside the lock: decisions go on
        with self._lock:
            self._interp, self._compiled, self._dynamic = interp, compiled, dynamic

    def evaluate_raw(self, input: Any) -> Any:
        """The raw entry-point value for ``input`` (``None`` when undefined).

        Raises:
            RegoFailure: engine error. ValueError: input not representable.
        """
        with self._lock:
            rego_native.set_input(self._runner, input)
            return rego_native.query_entrypoint(self._runner, self._compiled, ENTRYPOINT)

    def decide(self, input: Mapping[str, Any]) -> Decision:
        digest = self._bundle.digest
        try:
            raw = self.evaluate_raw(input)
        except (rego_native.RegoFailure, ValueError, RecursionError) as exc:
            _log.error("policy_engine_error", engine=self.name, bundle=digest, error=type(exc).__name__)
            return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        if raw is None:
            _log.error("policy_undefined", engine=self.name, bundle=digest)
            return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        return parse_decision(raw, digest, self.name, self._floors)
