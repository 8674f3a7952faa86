"""The policy's ``reads``: every entry of ``data.dynamic`` a decision looked up.

The server keeps a decision while entries it did not read change (server/decision_cache.py).
A rule that reads an entry it does not declare would make the server answer with a stale
decision (a deactivated camera still allowed), so the bundle runner decides every passing
case again with the entries its decision does not name removed, changed and added
(centinela.policy.testing, step 4). These tests take each declaration out of a copy of the
interim bundle, and put in a rule that reads a whole section, and require the runner to see
it; the shipped bundles pass the same check in tests/policy/test_rego_suites.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from centinela.policy import DYNAMIC_SECTIONS, Bundle, parse_decision
from centinela.policy.testing import Unread, perturbed

from ._raw import DENIED

BUNDLES = ("interim", "draft-2026")


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "interim"
    shutil.copytree(Bundle.load("interim").path, copy)
    return copy


def _failures(path: Path) -> dict[str, str]:
    return {r.name: r.message for r in Bundle.load(path).run_tests() if not r.passed}


@pytest.mark.parametrize(
    ("line", "instead", "cases"),
    [
        (
            "site_reads contains ctx_site_id if is_string(ctx_site_id)\n",
            "site_reads contains s if some s in set()\n",
            # R5 reads the camera's site
            (
                "test_r5_deny_unregistered_site",  # an absent entry, read
                "test_r10_allow_municipality_sees_minimal_fields",
            ),
        ),
        (
            "authorisation_reads contains ctx_authorisation_id"
            " if is_string(ctx_authorisation_id)\n",
            "authorisation_reads contains a if some a in set()\n",
            ("test_r3_allow_investigator_with_authorisation",),
        ),
        (
            "model_reads contains g if some g, _ in gallery_specs\n",
            "model_reads contains g if some g in set()\n",
            ("test_r13_allow_model_reported_by_server", "test_r13_deny_model_other_than_reported"),
        ),
    ],
)
def test_the_check_finds_an_entry_read_and_not_declared(
    tmp_path: Path, line: str, instead: str, cases: tuple[str, ...]
) -> None:
    copy = _copy(tmp_path)
    search = copy / "search.rego"
    text = search.read_text()
    assert line in text
    search.write_text(text.replace(line, instead))
    failures = _failures(copy)
    for case in cases:
        assert "its reads do not name" in failures.get(case, ""), (case, failures)


def test_the_check_finds_a_rule_that_reads_a_whole_section(tmp_path: Path) -> None:
    """Counting the sites reads every entry: no list of keys can declare it."""
    copy = _copy(tmp_path)
    with (copy / "search.rego").open("a") as f:
        f.write('\ndeny contains "R5" if count(sites) > 20\n')
    failures = _failures(copy)
    assert "test_r10_allow_municipality_sees_minimal_fields" in failures
    assert all("its reads do not name" in why for why in failures.values())


@pytest.mark.parametrize("name", BUNDLES)
def test_every_decision_of_the_shipped_bundles_says_what_it_read(
    name: str, cases_of: Any, engine_of: Any
) -> None:
    cases, _ = cases_of(name)
    engine = engine_of(name)
    for case in cases.values():
        reads = engine.decide(case["input"]).reads
        assert reads is not None
        assert set(reads) == set(DYNAMIC_SECTIONS)
    site = cases["r10_allow_municipality_sees_minimal_fields"]["input"]["context"]["site_id"]
    reads = engine.decide(cases["r10_allow_municipality_sees_minimal_fields"]["input"]).reads
    assert reads == {
        "sites": frozenset({site}),
        "authorisations": frozenset(),
        "models": frozenset({"pnp_watchlist"}),
    }


def test_the_variants_keep_exactly_the_entries_named() -> None:
    dynamic: dict[str, Any] = {
        "sites": {"a": {"active": True, "municipality": "m"}, "b": {"active": True}},
        "authorisations": {"X": {"revoked": False, "sites": ["a"]}},
    }
    unread = Unread({"c": {"input": {"context": {"site_id": "z"}}}}, dynamic)
    (_, removed), (_, changed) = unread.variants(dynamic, {"sites": ["a", "q"]})
    assert removed["sites"] == {"a": dynamic["sites"]["a"]}
    assert removed["authorisations"] == {}
    assert removed["models"] == {}
    assert changed["sites"]["a"] == dynamic["sites"]["a"]
    assert changed["sites"]["b"] == {"active": False}
    assert "q" not in changed["sites"]  # named: its absence is what was read
    # Every string of any input is a key added, with an entry copied from the data.
    for section in DYNAMIC_SECTIONS:
        assert "z" in changed[section]
        assert "context" in changed[section]
    assert changed["sites"]["z"] == dynamic["sites"]["a"]
    assert changed["authorisations"]["X"] == {"revoked": True, "sites": []}
    assert perturbed([]) == ["~"]
    assert perturbed(None) == "~"
    assert perturbed(2) == 3


@pytest.mark.parametrize(
    "reads",
    [
        {"objections": []},  # not a section the server pushes
        {"sites": "mira-cam-001"},
        {"sites": [1]},
        {"sites": [None]},
        {"sites": [f"s{i}" for i in range(1001)]},
        [],
        "sites",
    ],
)
def test_reads_off_contract_fail_closed(reads: Any) -> None:
    decision = parse_decision({**DENIED, "reads": reads}, "d", "e")
    assert decision.reasons == ("ENGINE_UNAVAILABLE",)


def test_reads_are_optional() -> None:
    raw = json.loads(json.dumps(DENIED))
    assert parse_decision(raw, "d", "e").reads is None
    raw["reads"] = {"sites": ["b", "a", "a"], "models": []}
    decision = parse_decision(raw, "d", "e")
    assert decision.reads == {"sites": frozenset({"a", "b"}), "models": frozenset()}
    assert decision.as_dict()["reads"] == {"sites": ["a", "b"], "models": []}
