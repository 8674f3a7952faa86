"""The same scenarios on every available engine must give identical decisions.

Engines: the embedded one (rego-cpp); the OPA-server engine against a real ``opa run
--server`` when an ``opa`` binary is on PATH (none is installable on this machine, so those
tests skip and say so); and the OPA-server engine against a loopback *stand-in* for the OPA
REST API (tests/policy/_opa_standin.py), the one mock here, for what cannot exist on this
machine: it checks the client path (requests, parsing, failure handling), not OPA's
semantics.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from centinela.policy import (
    ENGINE_UNAVAILABLE,
    Bundle,
    EmbeddedEngine,
    OpaServerEngine,
    PolicyEngine,
)

from ._opa_standin import OpaStandIn

BUNDLES = ("interim", "draft-2026")
OPA = shutil.which("opa")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def standin() -> Iterator[OpaStandIn]:
    server = OpaStandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def real_opa() -> Iterator[str]:
    if OPA is None:
        pytest.skip("no `opa` binary on PATH (no registry package ships one for this machine)")
    port = _free_port()
    proc = subprocess.Popen([OPA, "run", "--server", "--addr", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if requests.get(url + "/health", timeout=0.5).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _engine(
    kind: str, bundle: str, dynamic: dict[str, Any], request: pytest.FixtureRequest
) -> PolicyEngine:
    b = Bundle.load(bundle)
    if kind == "embedded":
        return EmbeddedEngine(b, dynamic)
    url = (
        request.getfixturevalue("standin").url
        if kind == "opa-standin"
        else request.getfixturevalue("real_opa")
    )
    if kind == "opa-standin":
        request.getfixturevalue("standin").mode = "ok"
    engine = OpaServerEngine(url, b, timeout_s=30.0)
    engine.publish(dynamic)
    return engine


def _normal(d: Any) -> dict[str, Any]:
    out: dict[str, Any] = d.as_dict()
    out.pop("engine")
    return out


@pytest.mark.parametrize("kind", ["opa-standin", "opa-real"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_engines_agree_on_every_scenario(
    kind: str, bundle: str, request: pytest.FixtureRequest, cases_of: Callable[..., Any]
) -> None:
    """Every Rego test case of the bundle is a scenario; decisions must be identical."""
    cases, dynamic = cases_of(bundle)
    scenarios = {n: c for n, c in cases.items() if "config" not in c and "dynamic" not in c}
    assert len(scenarios) > 50
    reference = EmbeddedEngine(Bundle.load(bundle), dynamic)
    other = _engine("opa-real" if kind == "opa-real" else "opa-standin", bundle, dynamic, request)
    for name, case in scenarios.items():
        assert _normal(other.decide(case["input"])) == _normal(reference.decide(case["input"])), (
            name
        )


@pytest.mark.parametrize("mode", ["error", "slow", "undefined", "garbage"])
def test_opa_failures_fail_closed(
    mode: str, standin: OpaStandIn, cases_of: Callable[..., Any]
) -> None:
    cases, dynamic = cases_of("interim")
    healthy = OpaServerEngine(standin.url, Bundle.load("interim"), timeout_s=30.0)
    healthy.publish(dynamic)
    inp = cases["r1_allow_declared_purpose"]["input"]
    assert healthy.decide(inp).allow
    # Only the "slow" case depends on the time-out; it is far below the stand-in's delay.
    engine = OpaServerEngine(
        standin.url, Bundle.load("interim"), timeout_s=0.3 if mode == "slow" else 30.0
    )
    standin.mode = mode
    try:
        d = engine.decide(inp)
    finally:
        standin.mode = "ok"
    assert (d.allow, d.reasons, d.engine) == (False, (ENGINE_UNAVAILABLE,), "opa")


def test_opa_unreachable_fails_closed() -> None:
    engine = OpaServerEngine(
        f"http://127.0.0.1:{_free_port()}", Bundle.load("interim"), timeout_s=0.3
    )
    d = engine.decide({"rpc": "MatchFace"})
    assert (d.allow, d.reasons) == (False, (ENGINE_UNAVAILABLE,))


def test_opa_dynamic_data_reaches_the_server(
    standin: OpaStandIn, cases_of: Callable[..., Any]
) -> None:
    cases, dynamic = cases_of("interim")
    engine = OpaServerEngine(standin.url, Bundle.load("interim"), timeout_s=30.0)
    engine.publish(dynamic)
    inp = cases["r1_allow_declared_purpose"]["input"]
    assert engine.decide(inp).allow
    engine.set_dynamic_data({"sites": {}, "authorisations": {}})
    assert engine.decide(inp).reasons == ("R5",)


def test_opa_url_must_be_http() -> None:
    from centinela.errors import ConfigError

    with pytest.raises(ConfigError):
        OpaServerEngine("unix:///tmp/opa.sock", Bundle.load("interim"))


def test_opa_publish_replaces_an_earlier_bundle(
    standin: OpaStandIn, cases_of: Callable[..., Any]
) -> None:
    """Switching bundles leaves no module of the old one behind (no mixed policy)."""
    cases, dynamic = cases_of("interim")
    standin.modules["centinela/stale_rule.rego"] = "package centinela\n\nstale := true\n"
    standin.modules["other/keep.rego"] = "package other\n\nx := 1\n"
    engine = OpaServerEngine(standin.url, Bundle.load("draft-2026"), timeout_s=30.0)
    engine.publish(dynamic)
    assert "centinela/stale_rule.rego" not in standin.modules
    assert "other/keep.rego" in standin.modules
    d = engine.decide(cases["r1_allow_declared_purpose"]["input"])
    assert d.obligations.two_person_confirmation  # draft-2026 semantics now
    del standin.modules["other/keep.rego"]


def test_opa_gets_one_module_per_package() -> None:
    """OPA compiles all it holds at each PUT, so a file whose rules name another file's
    cannot go alone: the files of a package go as one module, imports first, once."""
    from centinela.policy.opa import opa_modules

    modules = {
        "b.rego": "# b\npackage centinela\n\nimport rego.v1\n\nx := y\n",
        "a.rego": "package centinela\nimport rego.v1\nimport data.other\n\ny := 1\n",
        "other.rego": "package other\n\nz := 2\n",
        "loose.rego": "# no package line\n",
    }
    out = opa_modules(modules)
    assert set(out) == {"centinela/centinela.rego", "centinela/other.rego", "centinela/loose.rego"}
    merged = out["centinela/centinela.rego"]
    assert merged.startswith("package centinela\nimport rego.v1\nimport data.other\n")
    assert merged.count("package ") == 1
    assert merged.index("# ---- a.rego") < merged.index("y := 1") < merged.index("x := y")
    assert out["centinela/loose.rego"] == "# no package line\n"
    for name in ("interim", "draft-2026"):  # the shipped bundles: one package, one module
        assert list(opa_modules(Bundle.load(name).policy_modules)) == ["centinela/centinela.rego"]
