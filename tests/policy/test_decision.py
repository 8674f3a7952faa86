"""Parsing of raw engine results: anything off-contract is a deny (ENGINE_UNAVAILABLE)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.policy import ENGINE_UNAVAILABLE, Decision, parse_decision

GOOD: dict[str, Any] = {
    "allow": True,
    "reasons": ["R9", "R10", "R6", "R8"],
    "details": [],
    "obligations": {
        "galleries": ["pnp_watchlist"],
        "min_score": {"pnp_watchlist": 0.45},
        "max_results": 5,
        "mode": "ALERT",
        "visible_fields": ["alert", "score"],
        "human_review": True,
        "two_person_confirmation": False,
        "rate_ceiling": {"caller_per_minute": 600, "site_per_minute": 60},
        "active_only": True,
        "exclude_objectors": False,
        "objection_exempt_subjects": [],
        "alert_scope": None,
        "retain_non_hit_probe": False,
    },
}
FLOORS = {"pnp_watchlist": 0.42}


def _with(path: list[str], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def test_good_result_parses_and_orders_reasons() -> None:
    d = parse_decision(GOOD, "abc", "embedded", FLOORS)
    assert d.allow
    assert d.reasons == ("R6", "R8", "R9", "R10")
    assert d.obligations.min_score == {"pnp_watchlist": 0.45}
    assert d.obligations.rate_ceiling.caller_per_minute == 600
    assert d.bundle_digest == "abc"
    assert d.as_dict()["obligations"]["galleries"] == ["pnp_watchlist"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["allow"], "yes"),
        (["allow"], 1),
        (["reasons"], "R1"),
        (["reasons"], ["R99"]),
        (["reasons"], ["because"]),
        (["obligations"], None),
        (["obligations", "max_results"], 51),
        (["obligations", "max_results"], 2.5),
        (["obligations", "max_results"], True),
        (["obligations", "min_score"], {"pnp_watchlist": 1.5}),
        (["obligations", "min_score"], {"pnp_watchlist": float("nan")}),
        (["obligations", "min_score"], {}),
        (["obligations", "mode"], "GOD"),
        (["obligations", "galleries"], "pnp_watchlist"),
        (["obligations", "active_only"], False),
        (["obligations", "retain_non_hit_probe"], True),
        (["obligations", "rate_ceiling"], {"caller_per_minute": -1, "site_per_minute": 1}),
        (["obligations", "alert_scope"], {"level": 3}),
    ],
)
def test_malformed_result_denies(path: list[str], value: Any) -> None:
    d = parse_decision(_with(path, value), "abc", "embedded", FLOORS)
    assert not d.allow
    assert d.reasons == (ENGINE_UNAVAILABLE,)
    assert d.obligations.galleries == ()


def test_threshold_below_calibrated_floor_is_refused() -> None:
    """R8 is checked again on the way out: a policy bug cannot lower a floor."""
    d = parse_decision(
        _with(["obligations", "min_score"], {"pnp_watchlist": 0.3}), "abc", "e", FLOORS
    )
    assert d.reasons == (ENGINE_UNAVAILABLE,)


def test_deny_without_reason_is_refused() -> None:
    d = parse_decision(_with(["allow"], False) | {"reasons": []}, "abc", "e", FLOORS)
    assert d.reasons == (ENGINE_UNAVAILABLE,)


def test_a_deny_opens_nothing() -> None:
    raw = _with(["allow"], False) | {"reasons": ["R2"]}
    d = parse_decision(raw, "abc", "e", FLOORS)
    assert not d.allow
    assert d.obligations.galleries == ()
    assert d.obligations.max_results == 0
    assert d.obligations.visible_fields == ()


def test_deny_constructor() -> None:
    d = Decision.deny("ENGINE_UNAVAILABLE", "abc", "opa")
    assert (d.allow, d.reasons, d.engine) == (False, ("ENGINE_UNAVAILABLE",), "opa")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(raw=_json)
def test_arbitrary_json_never_raises_and_never_allows(raw: Any) -> None:
    d = parse_decision(raw, "abc", "e", FLOORS)
    assert not d.allow


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(GOOD["obligations"])), value=_json)
def test_any_single_field_corruption_is_safe(field: str, value: Any) -> None:
    """Whatever one obligation holds, an allow still has galleries at or above the floors."""
    d = parse_decision(_with(["obligations", field], value), "abc", "e", FLOORS)
    if d.allow:
        assert d.obligations.active_only
        assert not d.obligations.retain_non_hit_probe
        for g in d.obligations.galleries:
            assert d.obligations.min_score[g] >= FLOORS[g]
        assert 1 <= d.obligations.max_results <= 50
