"""The policy's ``instants``: every value at which a decision changes with a request's times
or its probe quality.

The server reuses a decision for any value between two declared instants
(server/decision_cache.py). A rule that compares one of those numbers with a value it does
not declare would make the server answer with a stale decision, so these tests decide every
Rego case of both bundles again at values next to every number its data holds (every
timestamp for a time, every number from 0 to 1 for the quality), inside the span the
decision declared, and require the same decision there.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from centinela.policy import INSTANT_FIELDS, Bundle, EmbeddedEngine, holds, parse_decision, span
from centinela.policy.testing import (
    _engine_for,
    load_cases,
    neighbours,
    read_number,
    rfc3339_ns,
    with_number,
)

from ._raw import DENIED

BUNDLES = ("interim", "draft-2026")
SECOND = 1_000_000_000
DAY = 86_400 * SECOND


def _numbers(doc: Any, integer: bool) -> Iterator[int | float]:
    """Every timestamp (``integer``) or every number from 0 to 1 anywhere in ``doc``."""
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _numbers(v, integer)
    elif isinstance(doc, list):
        for v in doc:
            yield from _numbers(v, integer)
    elif integer:
        ns = rfc3339_ns(doc)
        if ns is not None:
            yield ns
    elif type(doc) in (int, float) and 0 <= doc <= 1:
        yield doc


def _essence(raw: Any) -> Any:
    return {k: raw.get(k) for k in ("allow", "reasons", "obligations", "details")}


def undeclared_changes(bundle: Bundle, only: str = "") -> tuple[int, list[str]]:
    """(values probed, what changed where the decision said it would not) over every case
    (whose name contains ``only``)."""
    cases, fixture = load_cases(bundle)
    engines: dict[str, EmbeddedEngine] = {}
    probed, changed = 0, []
    for name, case in sorted(cases.items()):
        inp = case.get("input")
        if only not in name or not isinstance(inp, dict):
            continue
        engine = _engine_for(bundle, case, fixture, engines)
        raw = engine.evaluate_raw(inp)
        declared = raw.get("instants", {}) if isinstance(raw, dict) else {}
        data = [case.get("dynamic", fixture), bundle.config, case.get("config", {}), inp]
        for field, instants in sorted(declared.items()):
            integer = INSTANT_FIELDS[field]
            value = read_number(inp, field)
            if value is None:
                continue
            where = span(sorted(instants), value)
            marks = set(_numbers(data, integer))
            if integer:
                marks |= {value + d for d in (-3650 * DAY, -DAY, -SECOND, SECOND, DAY, 3650 * DAY)}
            # Each mark and its neighbour away from the case's value: either side of a
            # comparison with it, strict or not, that the value is not already on.
            near = {y for m in marks for y in (m, neighbours(m, integer)[value > m])}
            for x in sorted(near):
                if x == value or not holds(where, value, x):
                    continue
                probed += 1
                moved = with_number(inp, field, x)
                if _essence(engine.evaluate_raw(moved)) != _essence(raw):
                    changed.append(f"{name}: {field}={x!r} (declared {sorted(instants)})")
    return probed, changed


@pytest.mark.parametrize("name", BUNDLES)
def test_a_decision_holds_wherever_its_instants_say_it_does(name: str) -> None:
    probed, changed = undeclared_changes(Bundle.load(name))
    assert probed > 2000  # the cases do reach values next to every number of their data
    assert changed == []


def _drop(path: Path, lines: tuple[str, ...], keep_defined: str) -> None:
    text = path.read_text()
    for line in lines:
        assert line in text
        text = text.replace(line, "")
    path.write_text(text + keep_defined)  # the rules stay defined, so the bundle compiles


def test_the_check_finds_a_rule_whose_instants_are_not_declared(tmp_path: Path) -> None:
    """With the authorisation window's instants, and then the quality floor, taken out, R3's
    window and R13's floor are still read but declared nowhere: the check must see the
    decision change at them."""
    copy = tmp_path / "interim"
    shutil.copytree(Bundle.load("interim").path, copy)
    _drop(
        copy / "search.rego",
        (
            "now_instants contains t if some t in authorisation_window\n",
            "capture_instants contains t if some t in authorisation_window\n",
        ),
        "\nnow_instants contains t if some t in set()\n"
        "capture_instants contains t if some t in set()\n",
    )
    _, changed = undeclared_changes(Bundle.load(copy), only="r3_")
    assert any("r3_allow_investigator_with_authorisation: context.now=" in c for c in changed)
    assert any("context.capture_time=" in c for c in changed)

    shutil.rmtree(copy)
    shutil.copytree(Bundle.load("interim").path, copy)
    _drop(
        copy / "search.rego",
        ("quality_instants contains quality_floor if is_number(quality_floor)\n",),
        "",
    )
    _, changed = undeclared_changes(Bundle.load(copy), only="r13_")
    assert any("probe.quality=" in c for c in changed)


@pytest.mark.parametrize("name", BUNDLES)
def test_an_authorisation_window_declares_its_two_ends_exactly(name: str) -> None:
    """The engine's nanoseconds are exact integers, as Python parses the same times."""
    bundle = Bundle.load(name)
    cases, fixture = load_cases(bundle)
    engine = EmbeddedEngine(bundle, fixture)
    decision = engine.decide(cases["r3_allow_investigator_with_authorisation"]["input"])
    window = fixture["authorisations"]["AUT-2026-0001"]
    ends = (rfc3339_ns(window["not_before"]), rfc3339_ns(window["not_after"]))
    floor = bundle.config["quality_floor"]["face"]
    assert decision.allow
    assert decision.instants == {
        "context.now": ends,
        "context.capture_time": ends,
        "probe.quality": (0, floor, 1),
    }
    # A municipal probe reads no time against anything, and its quality against the floor.
    muni = engine.decide(cases["r10_allow_municipality_sees_minimal_fields"]["input"])
    assert muni.allow
    assert muni.instants["context.now"] == muni.instants["context.capture_time"] == ()
    assert muni.instants["probe.quality"] == (0, floor, 1)


def test_a_span_is_the_open_interval_between_neighbouring_instants() -> None:
    instants = (10, 20)
    assert span((), 5) == (None, None)
    assert span(instants, 5) == (None, 10)
    assert span(instants, 10) is None
    assert span(instants, 15) == (10, 20)
    assert span(instants, 25) == (20, None)
    assert holds((10, 20), 15, 11)
    assert not holds((10, 20), 15, 10)
    assert holds(None, 10, 10)
    assert not holds(None, 10, 11)
    assert holds((0.5, 1), 0.9, math.nextafter(0.5, 1))
    assert not holds((0.5, 1), 0.9, 0.5)


@pytest.mark.parametrize(
    "instants",
    [
        {"context.now": [1.5e18]},  # a float has lost the nanoseconds
        {"context.now": [True]},
        {"context.now": "1772359200000000000"},
        {"probe.quality": [float("nan")]},
        {"probe.quality": ["0.5"]},
        {"context.valid_until": [1]},  # not a number the server reuses decisions across
        {"now": [1]},
        {"context.now": list(range(1001))},
        [],
    ],
)
def test_instants_off_contract_fail_closed(instants: Any) -> None:
    decision = parse_decision({**DENIED, "instants": instants}, "d", "e")
    assert decision.reasons == ("ENGINE_UNAVAILABLE",)


def test_instants_are_sorted_and_optional() -> None:
    raw = json.loads(json.dumps(DENIED))
    assert parse_decision(raw, "d", "e").instants == {}
    raw["instants"] = {
        "context.now": [3, 1, 2, 1],
        "context.capture_time": [],
        "probe.quality": [1, 0.5, 0],
    }
    decision = parse_decision(raw, "d", "e")
    assert decision.instants == {
        "context.now": (1, 2, 3),
        "context.capture_time": (),
        "probe.quality": (0, 0.5, 1),
    }
    assert decision.reasons == ("R1",)
