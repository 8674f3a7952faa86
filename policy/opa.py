"""The OPA-server engine: an OPA sidecar queried over its REST data API.

Invariants (DESIGN.md §5):

* The decision is ``POST /v1/data/centinela/decision`` with ``{"input": …}``; anything but a
  200 with a ``result`` object that parses as a decision is a deny with ``ENGINE_UNAVAILABLE``
  (errors, time-outs and an undefined result alike). ``decide`` never raises.
* ``publish`` pushes the bundle's policy modules (tests excluded) and its static data, then
  deletes modules of an earlier bundle, so the sidecar evaluates the bundle whose digest
  this engine reports; dynamic data goes to ``PUT /v1/data/dynamic``. The files of one
  package go as one module (:func:`opa_modules`, id ``centinela/<package>.rego``): OPA
  compiles every module it holds at each ``PUT /v1/policies``, and a file pushed alone
  whose rules name a rule of another file not pushed yet would be refused (an unsafe
  variable), whatever the order.
  The push is module by module, not atomic: deployments that swap bundles under load should
  let OPA pull signed bundles instead (deploy/).
* An OPA that restarts loses what was pushed to it. Our bundles define the decision for
  every input once their data are there (decision.rego), so an undefined decision means
  the sidecar lost its modules or its data: that call is denied unless publishing
  everything again (at most once a :data:`REPUBLISH_INTERVAL_S`, one caller at a time)
  and asking once more gives a decision. The sidecar heals with no restart of Centinela
  and no change of data. An engine a reload replaces is retired first (:meth:`retire`):
  a call still in flight on it must not publish the old bundle over the new one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opa_client.opa import OpaClient

from centinela.errors import ConfigError, PolicyEngineUnavailable
from centinela.logs import get_logger
from centinela.policy.bundle import CONFIG_KEY, Bundle
from centinela.policy.decision import ENGINE_UNAVAILABLE, Decision, parse_decision
from centinela.policy.engine import check_dynamic

_log = get_logger("policy")

#: OPA policy ids of the modules we publish; stale ones under it are deleted on publish.
POLICY_PREFIX = "centinela/"
_PACKAGE = re.compile(r"^package\s+(\S+)\s*$", re.MULTILINE)


def opa_modules(modules: Mapping[str, str]) -> dict[str, str]:
    """The modules as pushed to OPA (policy id -> source): the files of each package joined
    into one module, the package line once and the imports first, each file's rules
    after a comment naming it. A file without a package line goes as it is."""
    packages: dict[str, list[tuple[str, str]]] = {}
    out: dict[str, str] = {}
    for name, src in sorted(modules.items()):
        found = _PACKAGE.search(src)
        if found is None:
            out[f"{POLICY_PREFIX}{name}"] = src
        else:
            packages.setdefault(found.group(1), []).append((name, src))
    for package, files in packages.items():
        imports: list[str] = []
        parts: list[str] = []
        for name, src in files:
            rules: list[str] = []
            for line in src.splitlines():
                if _PACKAGE.fullmatch(line):
                    continue
                if line.startswith("import "):
                    if line not in imports:
                        imports.append(line)
                    continue
                rules.append(line)
            parts.append(f"# ---- {name} ----\n" + "\n".join(rules))
        text = "\n".join([f"package {package}", *imports, "", *parts])
        out[f"{POLICY_PREFIX}{package}.rego"] = text + "\n"
    return out


#: The least time between two publications after undefined decisions (an OPA that keeps
#: losing its state is not pushed to on every call).
REPUBLISH_INTERVAL_S = 1.0


class OpaServerEngine:
    """Decisions from an OPA server at ``url`` (e.g. ``http://127.0.0.1:8181``)."""

    name = "opa"

    def __init__(self, url: str, bundle: Bundle, *, timeout_s: float = 0.5) -> None:
        """Connect lazily to ``url``; call :meth:`publish` to load the bundle into OPA.

        Raises:
            ConfigError: the URL is not ``http(s)://host:port``.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(f"OPA url must be http(s)://host:port, got {url!r}")
        self.url = url
        self._dynamic: dict[str, Any] = check_dynamic({})
        self._bundle = bundle
        self._floors = bundle.floors()
        self._republishing = threading.Lock()
        self._last_republish = -REPUBLISH_INTERVAL_S
        self._retired = False
        #: Times the bundle was published again after an undefined decision.
        self.republished = 0
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            timeout=timeout_s,
            retries=0,
        )

    @property
    def bundle(self) -> Bundle:
        """The bundle this engine reports (and publishes)."""
        return self._bundle

    @property
    def bundle_digest(self) -> str:
        return self._bundle.digest

    @property
    def dynamic(self) -> dict[str, Any]:
        """The ``data.dynamic`` document last pushed."""
        return self._dynamic

    def close(self) -> None:
        """Release the HTTP session."""
        self._client.close_connection()

    def publish(self, dynamic: Mapping[str, Any] | None = None) -> None:
        """Load the bundle's policy and data (and ``dynamic``) into the OPA server.

        Raises:
            PolicyEngineUnavailable: OPA refused a module or the data, or is unreachable.
        """
        try:
            self._client.update_or_create_data(dict(self._bundle.config), CONFIG_KEY)
            self._dynamic = check_dynamic(dynamic or {})
            self._client.update_or_create_data(self._dynamic, "dynamic")
            ours = opa_modules(self._bundle.policy_modules)
            for policy_id, src in sorted(ours.items()):
                self._client.update_policy_from_string(src, policy_id, rego_compat=False)
            for policy_id in self._client.get_policies_list():
                if policy_id.startswith(POLICY_PREFIX) and policy_id not in ours:
                    self._client.delete_policy(policy_id)
        except ConfigError:
            raise
        except Exception as exc:
            raise PolicyEngineUnavailable(f"cannot publish the bundle to OPA: {exc}") from exc

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        dynamic = check_dynamic(doc)
        try:
            self._client.update_or_create_data(dynamic, "dynamic")
        except Exception as exc:
            raise PolicyEngineUnavailable(f"cannot push dynamic data to OPA: {exc}") from exc
        self._dynamic = dynamic

    def evaluate_raw(self, input: Any) -> Any:
        """The raw ``result`` for ``input``, or ``None`` when OPA says it is undefined.

        Raises:
            Exception: whatever the HTTP client raises (connection, timeout, HTTP status).
        """
        body = self._client.query_rule(
            input_data=input, package_path="centinela", rule_name="decision"
        )
        if not isinstance(body, dict):
            return None
        return body.get("result")

    def decide(self, input: Mapping[str, Any]) -> Decision:
        digest = self._bundle.digest
        try:
            raw = self.evaluate_raw(dict(input) if isinstance(input, Mapping) else input)
        except Exception as exc:  # any client failure fails closed
            _log.error(
                "policy_engine_error", engine=self.name, bundle=digest, error=type(exc).__name__
            )
            return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        if raw is None:
            _log.error("policy_undefined", engine=self.name, bundle=digest)
            if not self._republish():
                return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
            try:
                raw = self.evaluate_raw(dict(input) if isinstance(input, Mapping) else input)
            except Exception as exc:
                _log.error(
                    "policy_engine_error", engine=self.name, bundle=digest, error=type(exc).__name__
                )
                return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
            if raw is None:
                return Decision.deny(ENGINE_UNAVAILABLE, digest, self.name)
        return parse_decision(raw, digest, self.name, self._floors)

    def retire(self) -> None:
        """Never publish again after an undefined decision: another engine's bundle takes
        the sidecar. Waits for a publication in progress to end."""
        with self._republishing:
            self._retired = True

    def resume(self) -> None:
        """Undo :meth:`retire`: the engine that was to replace this one was not made. Its
        publication may have failed half-way, leaving part of its bundle in the sidecar, so
        this engine's bundle and data are published again (as far as the sidecar lets)."""
        with self._republishing:
            self._retired = False
            try:
                self.publish(self._dynamic)
            except PolicyEngineUnavailable as exc:
                _log.error("policy_republish_failed", engine=self.name, error=str(exc))

    def _republish(self) -> bool:
        """Publish the bundle and the data in force again, after an undefined decision;
        whether it was done (not when another caller is at it, or did it less than
        REPUBLISH_INTERVAL_S ago, or OPA refused)."""
        if not self._republishing.acquire(blocking=False):
            return False
        try:
            now = time.monotonic()
            if self._retired or now - self._last_republish < REPUBLISH_INTERVAL_S:
                return False
            self._last_republish = now
            self.publish(self._dynamic)
        except PolicyEngineUnavailable as exc:
            _log.error("policy_republish_failed", engine=self.name, error=str(exc))
            return False
        finally:
            self._republishing.release()
        self.republished += 1
        _log.warning("policy_republished", engine=self.name, bundle=self._bundle.digest)
        return True
