"""The policy's ``time_instants``: every instant at which a decision changes with a time.

The server reuses a decision for any request time between two declared instants
(server/decision_cache.py). A rule that compares a time with an instant it does not declare
would make the server answer with a stale decision, so these tests decide every Rego case of
both bundles again at times near every timestamp its data holds, inside the span the decision
declared, and require the same decision there.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from centinela.policy import Bundle, EmbeddedEngine, parse_decision, time_span
from centinela.policy.testing import _engine_for, format_ns, load_cases, rfc3339_ns

BUNDLES = ("interim", "draft-2026")
SECOND = 1_000_000_000
DAY = 86_400 * SECOND


def _timestamps(doc: Any) -> Iterator[int]:
    """Every RFC 3339 time anywhere in ``doc``."""
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _timestamps(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _timestamps(v)
    else:
        ns = rfc3339_ns(doc)
        if ns is not None:
            yield ns


def _essence(raw: Any) -> Any:
    return {k: raw.get(k) for k in ("allow", "reasons", "obligations", "details")}


def undeclared_changes(bundle: Bundle, only: str = "") -> tuple[int, list[str]]:
    """(times probed, what changed where the decision said it would not) over every case
    (whose name contains ``only``)."""
    cases, fixture = load_cases(bundle)
    engines: dict[str, EmbeddedEngine] = {}
    probed, changed = 0, []
    for name, case in sorted(cases.items()):
        if only not in name:
            continue
        inp = case.get("input")
        ctx = inp.get("context") if isinstance(inp, dict) else None
        if not isinstance(ctx, dict):
            continue
        engine = _engine_for(bundle, case, fixture, engines)
        raw = engine.evaluate_raw(inp)
        declared = raw.get("time_instants", {}) if isinstance(raw, dict) else {}
        marks = set(_timestamps([case.get("dynamic", fixture), case.get("config", {}), inp]))
        for field, instants in sorted(declared.items()):
            t = rfc3339_ns(ctx.get(field))
            if t is None:
                continue
            lo, hi = time_span(sorted(instants), t)
            # The instant itself and its neighbour away from t: either side of a comparison
            # with m, strict or not, that t is not already on.
            near = {m + d for m in marks for d in ((0, 1) if t < m else (-1, 0))}
            near |= {t + d for d in (-3650 * DAY, -DAY, -SECOND, SECOND, DAY, 3650 * DAY)}
            for x in sorted(near):
                if x == t or (lo is not None and x < lo) or (hi is not None and x > hi):
                    continue
                probed += 1
                other = engine.evaluate_raw({**inp, "context": {**ctx, field: format_ns(x)}})
                if _essence(other) != _essence(raw):
                    changed.append(f"{name}: {field}={format_ns(x)} (declared {instants})")
    return probed, changed


@pytest.mark.parametrize("name", BUNDLES)
def test_a_decision_holds_wherever_its_time_instants_say_it_does(name: str) -> None:
    probed, changed = undeclared_changes(Bundle.load(name))
    assert probed > 1000  # the cases do reach times near every timestamp of their data
    assert changed == []


def test_the_check_finds_a_rule_whose_instants_are_not_declared(tmp_path: Path) -> None:
    """With the authorisation window's instants taken out, R3's window is still read but
    declared nowhere: the check above must see the decision change."""
    copy = tmp_path / "interim"
    shutil.copytree(Bundle.load("interim").path, copy)
    search = copy / "search.rego"
    text = search.read_text()
    for line in (
        "now_instants contains t if some t in authorisation_window\n",
        "capture_instants contains t if some t in authorisation_window\n",
    ):
        assert line in text
        text = text.replace(line, "")
    # The rules stay defined (empty), so the bundle still compiles.
    text += "\nnow_instants contains t if some t in set()\n"
    text += "capture_instants contains t if some t in set()\n"
    search.write_text(text)
    _, changed = undeclared_changes(Bundle.load(copy), only="r3_")
    assert any("r3_allow_investigator_with_authorisation: now=" in c for c in changed)
    assert any("capture_time=" in c for c in changed)


@pytest.mark.parametrize("name", BUNDLES)
def test_an_authorisation_window_declares_its_two_ends_exactly(name: str) -> None:
    """The engine's nanoseconds are exact integers, as Python parses the same times."""
    cases, fixture = load_cases(Bundle.load(name))
    engine = EmbeddedEngine(Bundle.load(name), fixture)
    decision = engine.decide(cases["r3_allow_investigator_with_authorisation"]["input"])
    window = fixture["authorisations"]["AUT-2026-0001"]
    ends = (rfc3339_ns(window["not_before"]), rfc3339_ns(window["not_after"]))
    assert decision.allow
    assert decision.time_instants == {"now": ends, "capture_time": ends}
    # A municipal probe reads no time against anything: no instants, one span for all time.
    muni = engine.decide(cases["r10_allow_municipality_sees_minimal_fields"]["input"])
    assert muni.allow
    assert muni.time_instants == {"now": (), "capture_time": ()}


def test_time_span_is_the_open_interval_between_neighbouring_instants() -> None:
    instants = (10, 20)
    assert time_span((), 5) == (None, None)
    assert time_span(instants, 5) == (None, 9)
    assert time_span(instants, 10) == (10, 10)
    assert time_span(instants, 15) == (11, 19)
    assert time_span(instants, 20) == (20, 20)
    assert time_span(instants, 25) == (21, None)


RAW = {
    "allow": False,
    "reasons": ["R1"],
    "obligations": {
        "galleries": [],
        "min_score": {},
        "max_results": 0,
        "mode": "READ",
        "visible_fields": [],
        "human_review": True,
        "two_person_confirmation": False,
        "rate_ceiling": {"caller_per_minute": 0, "site_per_minute": 0},
        "active_only": True,
        "exclude_objectors": False,
        "objection_exempt_subjects": [],
        "alert_scope": None,
    },
    "details": [],
}


@pytest.mark.parametrize(
    "instants",
    [
        {"now": [1.5e18]},  # a float has lost the nanoseconds
        {"now": [True]},
        {"now": "1772359200000000000"},
        {"valid_until": [1]},  # not a time of the input
        {"now": list(range(1001))},
        [],
    ],
)
def test_time_instants_off_contract_fail_closed(instants: Any) -> None:
    decision = parse_decision({**RAW, "time_instants": instants}, "d", "e")
    assert decision.reasons == ("ENGINE_UNAVAILABLE",)


def test_time_instants_are_sorted_and_optional() -> None:
    raw = json.loads(json.dumps(RAW))
    assert parse_decision(raw, "d", "e").time_instants == {}
    raw["time_instants"] = {"now": [3, 1, 2, 1], "capture_time": []}
    decision = parse_decision(raw, "d", "e")
    assert decision.time_instants == {"now": (1, 2, 3), "capture_time": ()}
    assert decision.reasons == ("R1",)
