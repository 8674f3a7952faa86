"""The embedded engine (real rego-cpp through regopy): decisions, failure modes, threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from centinela.errors import ConfigError
from centinela.policy import ENGINE_UNAVAILABLE, INPUT_MALFORMED, Bundle, EmbeddedEngine

Engines = Callable[[str], EmbeddedEngine]
Inputs = Callable[[str, str], dict[str, Any]]


def _tiny_bundle(tmp_path: Path, rego: str) -> Bundle:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "data.json").write_text(
        '{"centinela_config": {"galleries": {"pnp_watchlist": {"threshold_floor": 0.42}}}}'
    )
    (folder / "decision.rego").write_text("package centinela\n\n" + rego)
    return Bundle.load(folder)


def test_allows_municipal_face_alert(engine_of: Engines, case_input: Inputs) -> None:
    d = engine_of("interim").decide(case_input("interim", "r1_allow_declared_purpose"))
    assert d.allow
    assert d.obligations.galleries == ("pnp_watchlist",)
    assert d.obligations.human_review
    assert d.engine == "embedded"
    assert d.bundle_digest == Bundle.load("interim").digest


def test_municipality_cannot_search_registry(engine_of: Engines, case_input: Inputs) -> None:
    inp = case_input("interim", "r1_allow_declared_purpose") | {"galleries": ["reniec_registry"]}
    for bundle in ("interim", "draft-2026"):
        d = engine_of(bundle).decide(inp)
        assert not d.allow
        assert "R2" in d.reasons
        assert d.obligations.galleries == ()


@pytest.mark.parametrize(
    "garbage", [None, "x", 42, [], {}, {"caller": "root"}, {"rpc": ["MatchFace"]}]
)
def test_garbage_input_denies_as_malformed(engine_of: Engines, garbage: Any) -> None:
    d = engine_of("interim").decide(garbage)
    assert not d.allow
    assert d.reasons == (INPUT_MALFORMED,)


@pytest.mark.parametrize("bad", [{1: "int key"}, {"x": b"bytes"}, {"x": {1, 2}}, {"x": 2**80}])
def test_unrepresentable_input_fails_closed(engine_of: Engines, bad: Any) -> None:
    d = engine_of("interim").decide(bad)
    assert (d.allow, d.reasons) == (False, (ENGINE_UNAVAILABLE,))


def test_deeply_nested_input_fails_closed(engine_of: Engines) -> None:
    doc: Any = "leaf"
    for _ in range(5000):
        doc = [doc]
    d = engine_of("interim").decide({"rpc": doc})
    assert not d.allow


def test_undefined_decision_reads_as_engine_unavailable(tmp_path: Path) -> None:
    """A denied input that leaves the entry point undefined must never slip through."""
    engine = EmbeddedEngine(
        _tiny_bundle(tmp_path, 'decision := {"allow": true} if input.rpc == "x"\n')
    )
    d = engine.decide({"rpc": "y"})
    assert (d.allow, d.reasons) == (False, (ENGINE_UNAVAILABLE,))
    d = engine.decide({"rpc": "x"})  # defined but off-contract
    assert (d.allow, d.reasons) == (False, (ENGINE_UNAVAILABLE,))


def test_policy_cannot_lower_a_floor(tmp_path: Path) -> None:
    rego = (
        'decision := {"allow": true, "reasons": [], "obligations": {\n'
        '  "galleries": ["pnp_watchlist"],\n'
        '  "min_score": {"pnp_watchlist": 0.1}, "max_results": 5, "mode": "ALERT",\n'
        '  "visible_fields": [], "human_review": true, "two_person_confirmation": false,\n'
        '  "rate_ceiling": {"caller_per_minute": 1, "site_per_minute": 1}, "active_only": true,\n'
        '  "exclude_objectors": false, "objection_exempt_subjects": [], "alert_scope": null,\n'
        '  "retain_non_hit_probe": false, "x": input.rpc}}\n'
    )
    d = EmbeddedEngine(_tiny_bundle(tmp_path, rego)).decide({"rpc": "MatchFace"})
    assert (d.allow, d.reasons) == (False, (ENGINE_UNAVAILABLE,))


def test_bundle_that_does_not_compile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        EmbeddedEngine(_tiny_bundle(tmp_path, "decision := {\n"))


def test_dynamic_data_changes_jurisdiction(
    case_input: Inputs, cases_of: Callable[..., Any]
) -> None:
    """Moving a camera to another municipality takes effect on the next decision (R5)."""
    dynamic = cases_of("interim")[1]
    engine = EmbeddedEngine(Bundle.load("interim"), dynamic)
    inp = case_input("interim", "r1_allow_declared_purpose")
    assert engine.decide(inp).allow
    moved = {
        **dynamic,
        "sites": {
            **dynamic["sites"],
            inp["context"]["site_id"]: {
                "municipality": "muni-surco",
                "region": "LIMA",
                "active": True,
            },
        },
    }
    engine.set_dynamic_data(moved)
    d = engine.decide(inp)
    assert not d.allow
    assert d.reasons == ("R5",)
    with pytest.raises(ConfigError):
        engine.set_dynamic_data({"sites": []})
    assert not engine.decide(inp).allow  # the refused document changed nothing


@pytest.mark.parametrize("slots", [1, 2])
def test_concurrent_decisions_match_serial(slots: int, cases_of: Callable[..., Any]) -> None:
    engine = EmbeddedEngine(Bundle.load("draft-2026"), cases_of("draft-2026")[1], slots=slots)
    cases = [
        c["input"]
        for c in cases_of("draft-2026")[0].values()
        if "config" not in c and "dynamic" not in c
    ]
    expected = [engine.decide(i).as_dict() for i in cases]
    errors: list[str] = []

    def work(offset: int) -> None:
        for k in range(len(cases)):
            j = (k + offset) % len(cases)
            if engine.decide(cases[j]).as_dict() != expected[j]:
                errors.append(f"case {j}")

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("bundle", ["interim", "draft-2026"])
def test_every_rego_case_decides_the_same_through_decide(
    bundle: str, cases_of: Callable[..., Any]
) -> None:
    """The Python layer never turns a well-formed Rego decision into ENGINE_UNAVAILABLE."""
    cases, dynamic = cases_of(bundle)
    engine = EmbeddedEngine(Bundle.load(bundle), dynamic)
    for name, case in cases.items():
        if "config" in case or "dynamic" in case:
            continue
        raw = engine.evaluate_raw(case["input"])
        d = engine.decide(case["input"])
        assert d.allow == raw["allow"], name
        assert ENGINE_UNAVAILABLE not in d.reasons, name
