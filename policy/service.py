"""The policy service the server holds: active engine, optional shadow, reload, counters.

Invariants (DESIGN.md §5):

* Only the active engine decides. The shadow's decision is computed beside it, compared and
  counted; a shadow failure never changes, delays past its own evaluation, or raises into
  the active decision.
* A reload swaps in a new bundle only if it loads, compiles, and passes its own Rego tests;
  otherwise the running bundle stays and the refusal is logged as an error and returned.
* Dynamic data pushed through the service reaches both engines and survives reloads.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from centinela.errors import CentinelaError
from centinela.logs import get_logger
from centinela.policy.bundle import Bundle
from centinela.policy.decision import OBLIGATION_RULES, Decision
from centinela.policy.engine import EmbeddedEngine, PolicyEngine, check_dynamic
from centinela.policy.opa import OpaServerEngine

_log = get_logger("policy")

EngineFactory = Callable[[Bundle, Mapping[str, Any]], PolicyEngine]


@dataclasses.dataclass(frozen=True)
class ShadowedDecision:
    """The active decision (the one that counts) and, if configured, the shadow's."""

    active: Decision
    shadow: Decision | None
    #: Rule ids on which the two differ (empty when they agree or there is no shadow).
    disagreement: tuple[str, ...] = ()

    @property
    def disagrees(self) -> bool:
        """Whether the shadow bundle would have decided differently."""
        return bool(self.disagreement)


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    """What a reload did, per role ("active" / "shadow")."""

    ok: bool
    role: str
    digest_before: str
    digest_after: str
    message: str
    failed_tests: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether a new bundle is now in force."""
        return self.ok and self.digest_before != self.digest_after


def disagreement_rules(a: Decision, b: Decision) -> tuple[str, ...]:
    """Rule ids that explain how decisions ``a`` and ``b`` differ (sorted, unique)."""
    rules: set[str] = set()
    if a.allow != b.allow:
        denier = b if a.allow else a
        rules |= set(a.reasons) ^ set(b.reasons)
        rules |= set(denier.reasons)
    elif set(a.reasons) != set(b.reasons) and not a.allow:
        rules |= set(a.reasons) ^ set(b.reasons)
    if a.allow and b.allow:
        oa, ob = a.obligations.as_dict(), b.obligations.as_dict()
        for field, rule in OBLIGATION_RULES.items():
            if oa.get(field) != ob.get(field):
                rules.add(rule)
    return tuple(sorted(rules))


def default_factory(template: PolicyEngine | None) -> EngineFactory:
    """A factory building engines of the same kind as ``template`` for a new bundle
    (embedded without one)."""

    def make(bundle: Bundle, dynamic: Mapping[str, Any]) -> PolicyEngine:
        if isinstance(template, OpaServerEngine):
            engine = OpaServerEngine(template.url, bundle)
            engine.publish(dynamic)
            return engine
        return EmbeddedEngine(bundle, dynamic)

    return make


class PolicyService:
    """Active engine + optional shadow, with reload and per-rule disagreement counters."""

    def __init__(
        self,
        active: PolicyEngine,
        shadow: PolicyEngine | None = None,
        *,
        factory: EngineFactory | None = None,
        run_tests_on_reload: bool = True,
    ) -> None:
        self._active = active
        self._shadow = shadow
        self._factory = factory
        self._run_tests = run_tests_on_reload
        current = getattr(active, "dynamic", None)
        self._dynamic: dict[str, Any] = check_dynamic(
            current if isinstance(current, Mapping) else {}
        )
        self._counts: Counter[str] = Counter()
        self._compared = 0
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._watcher: _Watcher | None = None

    # ---- decisions -------------------------------------------------------------------

    @property
    def active(self) -> PolicyEngine:
        """The engine whose decisions count."""
        return self._active

    @property
    def shadow(self) -> PolicyEngine | None:
        """The shadow engine, if any."""
        return self._shadow

    @property
    def bundle_digest(self) -> str:
        """Digest of the active bundle (for health/info and every audit entry)."""
        return self._active.bundle_digest

    @property
    def shadow_digest(self) -> str | None:
        """Digest of the shadow bundle, if any."""
        return self._shadow.bundle_digest if self._shadow is not None else None

    def decide(self, input: Mapping[str, Any], *, tally: bool = True) -> ShadowedDecision:
        """Decide with the active engine and, if configured, compare with the shadow.

        ``tally``: count the comparison (:meth:`disagreements`). A caller that reuses
        decisions (the server's decision cache) passes False and tallies each request it
        answers instead (:meth:`tally`).
        """
        active, shadow = self._active, self._shadow
        decision = active.decide(input)
        if shadow is None:
            return ShadowedDecision(decision, None)
        try:
            other = shadow.decide(input)
        except Exception as exc:  # a shadow can never hurt the active path
            _log.error("shadow_policy_error", error=type(exc).__name__)
            return ShadowedDecision(decision, None)
        result = ShadowedDecision(decision, other, disagreement_rules(decision, other))
        if tally:
            self.tally(result)
        return result

    def tally(self, result: ShadowedDecision) -> None:
        """Count one request decided by both bundles, and the rules they differ on."""
        if result.shadow is None:
            return
        with self._lock:
            self._compared += 1
            self._counts.update(result.disagreement)

    def disagreements(self) -> dict[str, int]:
        """Requests on which the shadow disagreed, counted per rule id (each request's
        disagreement on allow or deny is also in the audit, SHADOW_DISAGREEMENT)."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def compared(self) -> int:
        """How many requests both bundles decided (a decision the server reused counts
        for each request it answered)."""
        with self._lock:
            return self._compared

    @property
    def dynamic_data(self) -> Mapping[str, Any]:
        """The ``data.dynamic`` document both engines hold (normalised)."""
        return self._dynamic

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        """Push ``data.dynamic`` (sites, authorisations) to both engines.

        Raises:
            ConfigError: malformed document. PolicyEngineUnavailable: an engine refused it.
        """
        dynamic = check_dynamic(doc)
        self._active.set_dynamic_data(dynamic)
        if self._shadow is not None:
            self._shadow.set_dynamic_data(dynamic)
        self._dynamic = dynamic

    # ---- reload ----------------------------------------------------------------------

    def reload(
        self, active: str | Path | None = None, shadow: str | Path | None = None
    ) -> list[ReloadResult]:
        """Reload the active (and shadow) bundle from disk, or from the given names/paths.

        Never raises; each result says whether that bundle was taken or refused and why.
        """
        with self._reload_lock:
            results = [self._reload_one("active", active)]
            if self._shadow is not None or shadow is not None:
                results.append(self._reload_one("shadow", shadow))
            return results

    @staticmethod
    def _replace(current: PolicyEngine | None, make: Callable[[], PolicyEngine]) -> PolicyEngine:
        """``make()`` the engine that replaces ``current``. An OPA engine is retired first,
        so that it never publishes its bundle again over its successor's (policy/opa.py),
        and resumed if the new one cannot be made."""
        retire = getattr(current, "retire", None)
        resume = getattr(current, "resume", None)
        if retire is not None:
            retire()
        try:
            return make()
        except BaseException:
            if resume is not None:
                resume()
            raise

    def _reload_one(self, role: str, source: str | Path | None) -> ReloadResult:
        current = self._active if role == "active" else self._shadow
        before = current.bundle_digest if current is not None else ""
        try:
            if source is None:
                if current is None:
                    return ReloadResult(True, role, "", "", "no shadow bundle configured")
                source = _bundle_of(current).path
            bundle = Bundle.load(source)
            if bundle.digest == before:
                return ReloadResult(True, role, before, before, "unchanged")
            if self._run_tests:
                failed = tuple(r.name for r in bundle.run_tests() if not r.passed)
                if failed:
                    msg = (
                        f"bundle {bundle.name} fails {len(failed)} of its own tests; "
                        f"kept {before[:12]}"
                    )
                    _log.error(
                        "policy_reload_refused", role=role, bundle=bundle.digest, failed=len(failed)
                    )
                    return ReloadResult(False, role, before, before, msg, failed)
            # A new shadow runs in process: one OPA server holds one bundle (server/wiring.py).
            template = (
                current if current is not None else (self._active if role == "active" else None)
            )
            factory = self._factory or default_factory(template)
            engine = self._replace(current, lambda: factory(bundle, self._dynamic))
        except CentinelaError as exc:
            _log.error("policy_reload_refused", role=role, error=exc.diagnostics())
            return ReloadResult(False, role, before, before, f"refused: {exc.diagnostics()}")
        except Exception as exc:  # reload must never take the running bundle down
            _log.error("policy_reload_refused", role=role, error=type(exc).__name__)
            return ReloadResult(
                False, role, before, before, f"refused: {type(exc).__name__}: {exc}"
            )
        if role == "active":
            self._active = engine
        else:
            self._shadow = engine
        _log.info("policy_reloaded", role=role, before=before, after=bundle.digest)
        return ReloadResult(
            True, role, before, bundle.digest, f"now {bundle.name} {bundle.digest[:12]}"
        )

    # ---- triggers --------------------------------------------------------------------

    def install_sighup(self) -> None:
        """Reload on SIGHUP (call from the main thread). The reload runs on its own thread."""

        def handler(_signum: int, _frame: Any) -> None:
            threading.Thread(target=self.reload, name="policy-reload", daemon=True).start()

        signal.signal(signal.SIGHUP, handler)

    def watch(self, interval_s: float = 2.0) -> None:
        """Poll the bundle folders every ``interval_s`` and reload when their digest changes."""
        if self._watcher is None:
            self._watcher = _Watcher(self, interval_s)
            self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the file watcher, if running."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None


def _bundle_of(engine: PolicyEngine) -> Bundle:
    bundle = getattr(engine, "bundle", None)
    if not isinstance(bundle, Bundle):
        raise TypeError("engine does not expose its bundle; pass a name or path to reload()")
    return bundle


class _Watcher:
    """A daemon thread that reloads when a bundle folder's digest changes."""

    def __init__(self, service: PolicyService, interval_s: float) -> None:
        self._service = service
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._initial = [e.bundle_digest for e in (service.active, service.shadow) if e is not None]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _on_disk(self) -> list[str]:
        digests = []
        for engine in (self._service.active, self._service.shadow):
            if engine is None:
                continue
            try:
                digests.append(Bundle.load(_bundle_of(engine).path).digest)
            except (CentinelaError, TypeError):
                digests.append("")
        return digests

    def _run(self) -> None:
        last_seen = self._initial
        while not self._stop.wait(self._interval):
            on_disk = self._on_disk()
            if on_disk != last_seen:  # try each new state of the files once
                last_seen = on_disk
                self._service.reload()
