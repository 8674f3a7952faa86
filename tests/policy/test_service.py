"""PolicyService: shadow evaluation, per-rule disagreement counters, reload and watch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from centinela.policy import Bundle, Decision, EmbeddedEngine, PolicyService
from centinela.policy.decision import Obligations
from centinela.policy.service import disagreement_rules

Inputs = Callable[[str, str], dict[str, Any]]


def _service(cases_of: Callable[..., Any], shadow: bool = True) -> PolicyService:
    dynamic = cases_of("interim")[1]
    active = EmbeddedEngine(Bundle.load("interim"), dynamic)
    other = EmbeddedEngine(Bundle.load("draft-2026"), dynamic) if shadow else None
    return PolicyService(active, other)


def test_shadow_counts_disagreements_per_rule(
    cases_of: Callable[..., Any], case_input: Inputs
) -> None:
    service = _service(cases_of)
    face = case_input("interim", "r1_allow_declared_purpose")
    admin = case_input("interim", "r15_allow_pnp_admin_with_warrant")
    registry = case_input("interim", "r3_allow_investigator_with_authorisation")

    r = service.decide(face)
    assert r.active.allow
    assert r.shadow is not None
    assert r.shadow.allow
    assert r.active.bundle_digest == Bundle.load("interim").digest  # only the active decides
    assert r.disagrees
    # draft-2026 raises the alert threshold (R8), wants two confirmations (R9) and lowers the
    # municipal rate ceiling (R14)
    assert set(r.disagreement) == {"R8", "R9", "R14"}
    assert not service.decide(admin).disagrees
    assert "R7" in service.decide(registry).disagreement  # draft excludes objectors
    counts = service.disagreements()
    assert counts["R8"] == 1
    assert counts["R9"] >= 1
    assert counts["R7"] == 1
    assert service.compared() == 3


def test_without_shadow_nothing_is_compared(
    cases_of: Callable[..., Any], case_input: Inputs
) -> None:
    service = _service(cases_of, shadow=False)
    r = service.decide(case_input("interim", "r1_allow_declared_purpose"))
    assert r.shadow is None
    assert not r.disagrees
    assert service.disagreements() == {}
    assert service.shadow_digest is None


class _ExplodingEngine:
    name = "broken"
    bundle_digest = "0" * 64

    def decide(self, input: Any) -> Decision:
        raise RuntimeError("shadow down")

    def set_dynamic_data(self, doc: Any) -> None:
        raise RuntimeError("shadow down")


def test_shadow_failure_never_touches_the_active_decision(
    cases_of: Callable[..., Any], case_input: Inputs
) -> None:
    """A stand-in engine that raises: the one double here (a shadow that crashes)."""
    active = EmbeddedEngine(Bundle.load("interim"), cases_of("interim")[1])
    service = PolicyService(active, _ExplodingEngine())
    r = service.decide(case_input("interim", "r1_allow_declared_purpose"))
    assert r.active.allow
    assert r.shadow is None


def test_disagreement_on_allow_cites_the_denying_rules() -> None:
    allow = Decision(
        True, ("R8",), Obligations(galleries=("g",), min_score={"g": 0.5}, max_results=1), "a", "e"
    )
    deny = Decision.deny("R7", "b", "e")
    assert disagreement_rules(allow, deny) == ("R7", "R8")


def test_reload_takes_a_valid_edit(
    bundle_copy: Path,
    json_edit: Callable[..., None],
    cases_of: Callable[..., Any],
    case_input: Inputs,
) -> None:
    engine = EmbeddedEngine(Bundle.load(bundle_copy), cases_of("interim")[1])
    service = PolicyService(engine)
    before = service.bundle_digest
    assert service.reload()[0].message == "unchanged"

    def raise_floor(doc: dict[str, Any]) -> None:
        doc["centinela_config"]["galleries"]["pnp_watchlist"]["threshold_floor"] = 0.47
        doc["centinela_config"]["galleries"]["pnp_watchlist"]["alert_threshold"] = 0.47

    json_edit(bundle_copy / "data.json", raise_floor)
    (result,) = service.reload()
    assert result.ok
    assert result.changed
    assert service.bundle_digest != before
    d = service.decide(case_input("interim", "r1_allow_declared_purpose")).active
    assert d.allow
    assert d.obligations.min_score["pnp_watchlist"] == 0.47
    # dynamic data pushed before the reload is still there (R5 passes for the own site)


def test_reload_refuses_a_bundle_failing_its_tests(
    bundle_copy: Path, json_edit: Callable[..., None]
) -> None:
    service = PolicyService(EmbeddedEngine(Bundle.load(bundle_copy)))
    before = service.bundle_digest

    def open_registry(doc: dict[str, Any]) -> None:
        doc["centinela_config"]["roles"]["municipality"]["operator"]["galleries"].append(
            "reniec_registry"
        )

    json_edit(bundle_copy / "data.json", open_registry)
    (result,) = service.reload()
    assert not result.ok
    assert "test_r2_deny_municipality_cannot_search_registry" in result.failed_tests
    assert service.bundle_digest == before


def test_reload_refuses_a_bundle_that_does_not_compile(bundle_copy: Path) -> None:
    service = PolicyService(EmbeddedEngine(Bundle.load(bundle_copy)))
    before = service.bundle_digest
    (bundle_copy / "decision.rego").write_text("package centinela\n\ndecision := {\n")
    (result,) = service.reload()
    assert not result.ok
    assert service.bundle_digest == before


def test_reload_refuses_unknown_bundle_name(cases_of: Callable[..., Any]) -> None:
    service = _service(cases_of)
    results = service.reload(active="no-such-bundle")
    assert not results[0].ok
    assert "no policy bundle" in results[0].message
    assert results[1].message == "unchanged"


def test_watch_reloads_on_file_change(bundle_copy: Path, json_edit: Callable[..., None]) -> None:
    service = PolicyService(EmbeddedEngine(Bundle.load(bundle_copy)), run_tests_on_reload=False)
    before = service.bundle_digest
    service.watch(interval_s=0.05)
    try:
        json_edit(
            bundle_copy / "data.json",
            lambda d: d["centinela_config"]["quality_floor"].update(face=0.55),
        )
        for _ in range(200):
            if service.bundle_digest != before:
                break
            time.sleep(0.05)
    finally:
        service.stop_watching()
    assert service.bundle_digest == Bundle.load(bundle_copy).digest != before


def test_dynamic_data_reaches_both_engines(
    cases_of: Callable[..., Any], case_input: Inputs
) -> None:
    service = _service(cases_of)
    inp = case_input("interim", "r1_allow_declared_purpose")
    service.set_dynamic_data({"sites": {}, "authorisations": {}})
    r = service.decide(inp)
    assert r.active.reasons == ("R5",)
    assert r.shadow is not None
    assert r.shadow.reasons == ("R5",)
